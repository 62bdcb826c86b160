"""llama.cpp's CPU backend as llama-bench sets it up: the backend loaded (a build with runtime CPU
dispatch loads the variant best for this CPU), and one persistent thread pool per context.

- A llama.cpp built with `GGML_BACKEND_DL=ON GGML_CPU_ALL_VARIANTS=ON` (the Docker image) has no
  backend linked in: `ensure_backends` loads them from the library's folder, where ggml scores
  each `libggml-cpu-<variant>.so` against the CPU and keeps the best. `cpu_variant` names the one
  in use, for the start-up line.
- Built with OpenMP, ggml's barriers are libgomp's, and libgomp is PyTorch's too (one soname per
  process); `uses_openmp` tells, for the start-up line. The requirements build without it.
- Without a thread pool of its own, every `llama_decode` makes and joins its worker threads again;
  llama-bench attaches one pool to its context (`ggml_threadpool_new` + `llama_attach_threadpool`),
  and so do we, so that our figures and its are taken the same way.

Symbols are looked up through libllama's handle (dlsym searches its dependencies too), so that a
llama.cpp loaded from LLAMA_CPP_LIB_PATH is the one asked; ggml-cpu's own functions come from the
CPU backend's registry entry, as llama-bench gets them, since a dispatching build does not export
them from any library linked at load time.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

GGML_MAX_N_THREADS = 512  # ggml.h: the length of a thread pool's CPU mask


class ThreadpoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


def _lib(llama):
    lib = llama.llama_cpp._lib
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_threadpool_params_default.restype = ThreadpoolParams
    lib.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
    lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def ensure_backends(llama) -> None:
    """Load llama.cpp's backends from its library folder when none is linked in (a dispatching build)."""
    lib = _lib(llama)
    if lib.ggml_backend_reg_count() == 0:
        folder = Path(llama.llama_cpp.__file__).parent / "lib"
        override = os.environ.get("LLAMA_CPP_LIB_PATH")
        lib.ggml_backend_load_all_from_path(str(Path(override) if override else folder).encode())


def cpu_variant() -> str:
    """The CPU code llama.cpp runs: the variant a dispatching build picked (e.g. `haswell`, `icelake`),
    or `native` for a library built for the machine it was installed on."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"libggml-cpu-([A-Za-z0-9_]+)\.so", maps)
    return found.group(1) if found else "native"


def uses_openmp(llama) -> bool:
    """Whether this llama.cpp runs its workers on OpenMP (GGML_OPENMP=ON), whose libgomp it then shares
    with PyTorch: more OpenMP threads in the process than cores (PyTorch's own pools count) and libgomp
    stops spinning at every barrier of a decode step, sleeping and waking instead (measured: 7.1 against
    8.6 tokens/s for a 7B q4_0 on 2 cores). Built without it, ggml's own thread pool runs the step."""
    return b"OPENMP = 1" in (llama.llama_print_system_info() or b"")


class Threadpool:
    """One persistent ggml thread pool of `threads` workers, attached to a context (llama-bench's poll 50)."""

    def __init__(self, llama, threads: int, poll: int = 50) -> None:
        self.lib = lib = _lib(llama)
        reg = lib.ggml_backend_reg_by_name(b"CPU")
        new = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new") if reg else None
        free = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free") if reg else None
        self.pool = None
        if not new or not free:
            return  # a llama.cpp without them: it makes its workers per call, as before
        self._new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ThreadpoolParams))(new)
        self._free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free)
        params = lib.ggml_threadpool_params_default(threads)
        params.poll = poll
        self.pool = self._new(ctypes.byref(params))

    def attach(self, ctx) -> None:
        if self.pool:
            self.lib.llama_attach_threadpool(ctypes.cast(ctx, ctypes.c_void_p), self.pool, self.pool)

    def close(self) -> None:
        if self.pool:
            self._free(self.pool)
            self.pool = None
