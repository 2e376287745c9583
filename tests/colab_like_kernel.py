"""An IPython kernel that behaves like Colab's for widgets.

- Comm messages sent from a thread the user started are dropped: Colab's front end never shows them
  (googlecolab/colabtools#3373). Messages sent while the kernel handles a cell or a widget event go out.
- It does not offer kernel subshells (Colab's ipykernel has none), so JupyterLab sends widget events to the
  main shell, as Colab does, instead of to a subshell thread.

Run as a kernel: `python tests/colab_like_kernel.py -f {connection_file}` (tests/test_browser.py installs the spec)."""
import threading

import comm.base_comm
import ipykernel.comm.comm as kernel_comm
from ipykernel.kernelbase import Kernel


def _main_thread_only(publish):
    def publish_msg(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread(): return publish(self, *args, **kwargs)
    return publish_msg


for cls in {comm.base_comm.BaseComm, kernel_comm.BaseComm, kernel_comm.Comm}:
    if "publish_msg" in vars(cls): cls.publish_msg = _main_thread_only(vars(cls)["publish_msg"])

_info = Kernel.kernel_info.fget
Kernel.kernel_info = property(lambda self: {**_info(self), "supported_features": [
    f for f in _info(self)["supported_features"] if f != "kernel subshells"]})

if __name__ == "__main__":
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()
