"""timm as a test oracle, importable where torchvision is not installed.

timm's ViT code (timm.models.vision_transformer, timm.layers) never touches torchvision, but `import timm` imports
timm.data, whose transforms import torchvision at import time; and PyPI's torchvision wheels each pin one torch
version, so none installs beside this repository's torch. `load_timm` therefore imports timm, when torchvision is
missing, with a stand-in on sys.meta_path: every `torchvision[.x]` module imports, and any name taken from one is an
inert placeholder class. The stand-in exists only while timm is imported: afterwards the finder and the placeholder
modules are removed, so the rest of the session (transformers' `is_torchvision_available` among it) still sees no
torchvision. What needs the real torchvision, timm's image transforms, must not be called; the tests use timm's
models and its hub save/load only.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager


class _Placeholder(type):
    """A class whose every attribute is another placeholder class, so `InterpolationMode.BICUBIC`, subclassing and
    dictionary keys at import time all work. Dunder lookups fail as on a plain class."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds every torchvision module, each an empty package that answers any name with a placeholder class."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attribute):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            return _Placeholder(attribute, (), {})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module):
        pass


@contextmanager
def _torchvision_stand_in():
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name, module in sys.modules.items()
                     if getattr(getattr(module, "__spec__", None), "loader", None) is finder]:
            del sys.modules[name]


def load_timm():
    """The timm module, or None when timm is not installed. Any other import failure raises."""
    if importlib.util.find_spec("timm") is None:
        return None
    if importlib.util.find_spec("torchvision") is not None:
        import timm
        return timm
    with _torchvision_stand_in():
        import timm
    return timm


def save_timm(model, folder, model_args, safe_serialization=True):
    """timm.models.save_for_hf (timm's hub layout: config.json and model.safetensors or pytorch_model.bin), with the
    config's "model_args" that create_model was given: timm 1.0.31 writes them itself, earlier versions (1.0.29) do
    not, and a loader cannot know a shrunk model's sizes without them."""
    import json
    from timm.models import save_for_hf
    save_for_hf(model, folder, safe_serialization=safe_serialization)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_args", model_args)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def create_like_prismatic(timm, folder, image_size):
    """The tower in a timm hub folder created as the released code creates it (dinosiglip_vit.py,
    DinoSigLIPViTBackbone: timm.create_model(name, pretrained=True, num_classes=0, img_size=default_image_size)), its
    weights from the folder's file through timm's own loading (checkpoint_filter_fn resamples pos_embed)."""
    import json
    config = json.loads((folder / "config.json").read_text())
    args = {k: v for k, v in config.get("model_args", {}).items() if k not in ("img_size", "num_classes")}
    file = folder / "model.safetensors"
    file = file if file.is_file() else folder / "pytorch_model.bin"
    return timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                             num_classes=0, img_size=image_size, **args).eval()
