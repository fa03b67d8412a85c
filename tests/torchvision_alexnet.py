"""torchvision.models.alexnet().state_dict(): keys and shapes, pinned here because torchvision is not
installed next to the CPU torch (alexnet-owt-7be5be79.pth holds exactly these). Shared by the tests of the
two scripts that define AlexNet themselves (gan_flow, deep_anomaly)."""
import torch

TORCHVISION_ALEXNET = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}
TORCHVISION_ALEXNET_FEATURES = {k: v for k, v in TORCHVISION_ALEXNET.items() if k.startswith("features.")}


def torchvision_like_state(seed=0):
    """A state dict with torchvision's AlexNet keys and shapes: random features, and classifier tensors that
    are zero-stride expanded views (a few bytes on disk), since the scripts must ignore them anyway."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in TORCHVISION_ALEXNET.items():
        if key.startswith("features."):
            state[key] = torch.randn(shape, generator=g)
        else:
            state[key] = torch.zeros(1).expand(shape)
    return state
