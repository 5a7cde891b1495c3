"""Types of the compiled module (csrc/bindings.cpp): a raw-pointer API.

Pointers are integers (``tensor.data_ptr()``), ``dtype`` is 0 (float32) or 1 (float64),
``device`` is -1 for the CPU or a CUDA device index, ``stream`` a ``cudaStream_t`` as an integer
and ``workspace`` a device pointer (both ignored on the CPU). Argument errors raise ValueError.
Use :mod:`expand_and_cluster.ops`, which validates tensors first.
"""

__version__: str
openmp: bool

def mlp_forward(
    w: list[int],
    b: list[int],
    widths: list[int],
    n_students: int,
    batch: int,
    x: int,
    out: int,
    activation: int,
    dtype: int,
    device: int,
    stream: int = 0,
    workspace: int = 0,
    workspace_bytes: int = 0,
) -> None: ...
def mlp_mse_grad(
    w: list[int],
    b: list[int],
    widths: list[int],
    n_students: int,
    batch: int,
    x: int,
    y: int,
    loss: int,
    gw: list[int],
    gb: list[int],
    activation: int,
    dtype: int,
    device: int,
    stream: int = 0,
    workspace: int = 0,
    workspace_bytes: int = 0,
) -> None: ...
def mlp_workspace_bytes(
    widths: list[int],
    n_students: int,
    batch: int,
    activation: int,
    dtype: int,
    device: int,
    grad: bool,
) -> int: ...
def adam_step(
    params: list[int],
    grads: list[int],
    exp_avg: list[int],
    exp_avg_sq: list[int],
    numel_per_student: list[int],
    n_students: int,
    lr: int,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    dtype: int,
    device: int,
    stream: int = 0,
) -> None: ...
def cosine_distances(
    v: int,
    m: int,
    d: int,
    dtype: int,
    absolute: bool,
    out: int,
    device: int,
    stream: int = 0,
    workspace: int = 0,
) -> None: ...
def plateau_step(
    n_students: int,
    epoch: int,
    loss: int,
    state: list[int],
    step_lr: int,
    step_dtype: int,
    var_y: float,
    patience: int,
    cooldown: int,
    factor: float,
    target: float,
    min_lr: float,
    device: int,
    stream: int = 0,
) -> None: ...
def average_linkage(dist: int, m: int, z: int, /) -> None: ...
def backends() -> list[str]: ...
def num_threads() -> int: ...
def set_num_threads(n: int, /) -> None: ...
def set_cuda_thin_kernel_variant(variant: int) -> None: ...
def cuda_thin_kernel_variant() -> int: ...
