"""matplotlib's backend in task processes: IPython's inline backend, with the
shell it shows figures through made first.

``plt.show()`` then publishes each figure with ``display()``, as in a kernel
(the canvas is Agg: nothing interactive), in a task that did not load IPython
before: a library drawing with pyplot makes the shell the moment matplotlib
picks its backend, not after its figures went to stdout as text.
"""
from flowmagic.runtime.worker.execute import prepare_shell

prepare_shell(warm=False)

from matplotlib_inline.backend_inline import *  # noqa: E402,F401,F403 - this module is that backend
from matplotlib_inline.backend_inline import FigureCanvas, new_figure_manager, show  # noqa: E402,F401
