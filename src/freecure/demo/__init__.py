"""`freecure demo`: a Gradio page to try FreeCure (upload a face, type a prompt, compare FD | PD |
FreeCure). Needs the ``demo`` extra: ``pip install 'freecure[demo]'`` (Gradio)."""

from .methods import METHODS, Method

__all__ = ["METHODS", "Method", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`freecure.demo.app.create_app` (imported lazily: it needs Gradio)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
