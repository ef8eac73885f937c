"""spinmeround-lite: one face image in, a consistent 360-degree set of head views and normal maps out.

    from spinmeround_lite import spin
    result = spin("face.png", n_views=48)      # see spinmeround_lite/spinning.py

One name, one thing: ``spinmeround_lite.spin`` is the function; its module is ``spinmeround_lite.spinning``
(``python -m spinmeround_lite.spin IMAGE ...`` is its command line). No exported name is also a submodule.

Importing the package is light: ``spin`` (and torch, diffusers) load on first use.
"""

__version__ = "0.1.0"
__all__ = ["spin", "__version__"]


def __getattr__(name):
    if name == "spin":
        from .spinning import spin

        globals()["spin"] = spin
        return spin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
