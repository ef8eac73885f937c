"""spinmeround-lite: one face image in, a consistent 360-degree set of head views and normal maps out.

    from spinmeround_lite import spin
    result = spin("face.png", n_views=48)      # see spinmeround_lite/spin.py

Importing the package is light: ``spin`` (and torch, diffusers) load on first use.
"""

__version__ = "0.1.0"
__all__ = ["spin", "__version__"]


def __getattr__(name):
    if name == "spin":
        import importlib

        module = importlib.import_module(".spin", __name__)
        globals()["spin"] = module.spin           # the function, not the module of the same name
        return module.spin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
