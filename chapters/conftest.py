"""nbval starts one Jupyter kernel per notebook. With two pytest-xdist workers, two kernels can
start at the same moment and race for the same free TCP ports (jupyter_client picks free ports,
releases them, and the kernel binds them a moment later); the kernel that loses exits before it
answers, and every cell of its notebook errors at setup ("Kernel died before replying to
kernel_info", seen once in a CI run here). A second start picks new ports. Only the kernel's
start is retried: a notebook's own failures are reported as they are."""
import logging

import nbval.kernel

_start_new_kernel = nbval.kernel.start_new_kernel


def _start_new_kernel_retrying_once(*args, **kwargs):
    try:
        return _start_new_kernel(*args, **kwargs)
    except RuntimeError:
        logging.getLogger(__name__).warning("the kernel died while starting; starting it again")
        return _start_new_kernel(*args, **kwargs)


nbval.kernel.start_new_kernel = _start_new_kernel_retrying_once
