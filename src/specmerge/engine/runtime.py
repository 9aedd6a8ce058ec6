"""Where a merge runs: the device, the backend (local threads or a Ray cluster), the sizes
given as options, and the meters of peak host and GPU memory."""

from __future__ import annotations

import resource
import sys

import torch

from specmerge.backends import Backend, LocalBackend
from specmerge.errors import SpecmergeError
from specmerge.io.writer import parse_size
from specmerge.recipe import Recipe


def resolve_device(device: str | torch.device, remote: bool = False) -> str:
    """``device`` checked for this process, or for a remote backend's workers (``remote``):
    there CUDA is the GPU that Ray gave the task, ``cuda``, and the driver needs none."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise SpecmergeError(f"invalid device {str(device)!r}: use cpu, cuda or cuda:N") from err
    if remote:
        return dev.type
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecmergeError("device 'cuda' requested but torch.cuda.is_available() is False; "
                             "install a CUDA build of torch or use --device cpu")
    return str(dev)


def make_backend(workers: int, backend: str | Backend | None = None, device: str = "cpu",
                 ray_address: str | None = None, ray_gpus: float | None = None,
                 ray_cpus: float | None = None) -> Backend:
    """The backend a merge runs on: ``local`` (``workers`` threads in this process), ``ray``
    (tasks on the Ray cluster at ``ray_address``; ``ray_gpus``/``ray_cpus`` per task), or a
    ready Backend object."""
    if workers < 1:
        raise SpecmergeError(f"workers must be >= 1, got {workers}")
    if backend is None or backend == "local":
        if ray_address is not None or ray_gpus is not None or ray_cpus is not None:
            raise SpecmergeError("ray_address, ray_gpus and ray_cpus apply to backend 'ray' "
                                 "only (--backend ray)")
        return LocalBackend(workers)
    if not isinstance(backend, str):
        return backend
    if backend != "ray":
        raise SpecmergeError(f"unknown backend {backend!r}: use local or ray")
    if workers != 1:
        raise SpecmergeError("workers applies to the local backend; the ray backend runs as "
                             "many tasks at once as the cluster has CPUs (or GPUs)")
    from specmerge.ray_backend import RayBackend

    return RayBackend(address=ray_address, num_cpus=ray_cpus,
                      num_gpus=1.0 if ray_gpus is None else ray_gpus,
                      use_gpus=torch.device(device).type == "cuda")



def parse_option_size(value: str | int, option: str) -> int:
    """``parse_size`` whose error names the option."""
    try:
        return parse_size(value)
    except ValueError as err:
        raise SpecmergeError(f"{option}: {err}") from None



def backend_choice(rec: Recipe, backend: str | Backend | None, ray_address: str | None,
                   ray_gpus: float | None, ray_cpus: float | None, device: str
                   ) -> tuple[str | Backend | None, str, str | None, float | None, float | None]:
    """``make_backend``'s arguments after ``workers``: the caller's, over the recipe's
    ``backend`` (the caller's backend name replaces the recipe's settings with it)."""
    spec = rec.backend
    if spec is not None and (backend is None or backend == spec.name):
        backend = spec.name
        ray_address = spec.address if ray_address is None else ray_address
        ray_gpus = spec.num_gpus if ray_gpus is None else ray_gpus
        ray_cpus = spec.num_cpus if ray_cpus is None else ray_cpus
    return backend, device, ray_address, ray_gpus, ray_cpus



def peak_rss_mb() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024 * 1024) if sys.platform == "darwin" else ru / 1024


def reset_gpu_peak(device: str, backend: Backend | None = None) -> None:
    """Start ``gpu_peak_mb``'s count afresh (a no-op off CUDA and on a remote backend)."""
    if torch.device(device).type == "cuda" and not (backend is not None and backend.remote):
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: str, backend: Backend | None = None) -> float | None:
    """The most GPU memory torch's allocator held since ``reset_gpu_peak`` (MiB), or None off
    CUDA and on a remote backend (its workers' GPUs). Memory the CUDA context and other
    processes hold is not counted."""
    if torch.device(device).type != "cuda" or (backend is not None and backend.remote):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20

