"""The machine a job runs on, as every machine-derived choice sees it: CPUs, CUDA, bf16.

Everything the project chooses from the machine rather than from the config (DataLoader workers,
pinned memory, persistent workers and prefetch, the device, `precision=auto`, fused AdamW) is a
function of a `Machine`, so a test on a 2-core CPU box can ask for the choices a 16-CPU CUDA node
makes. `Machine.detect()` reads the real machine; the environment variable

    MDFNET_MACHINE="cpus=16,cuda=true,bf16=true"

describes another one to every process of a job (the launcher, its DDP workers, the evaluation,
the benchmark), each key optional (unset keys are detected). When it claims CUDA on a machine
without a usable GPU, the choices are CUDA's and the computation stays on the CPU, as far as a CPU
can take them: pinned memory needs a CUDA driver (torch's DataLoader then warns and does not pin),
and NCCL needs GPUs (the process group uses gloo).

The CPUs a process may use are its affinity set, capped by its SLURM allocation: a cluster that
does not bind tasks to cores (`TaskPlugin=task/none`, or cgroups without `ConstrainCores`) lets a job
of `--cpus-per-task=1` see every CPU of the node, and torch would start a thread on each. Two such
jobs on one node then spin-wait on each other's cores: on the 2-core CI machine two stage-1 jobs with
torch's 2 threads each took 16-275 s per epoch against 4.4 s for one alone, and 7.5 s each with one
thread each (`set_compute_threads`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

ENV_VAR = "MDFNET_MACHINE"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Machine:
    cpus: int  # CPUs this process may use (its affinity set, capped by SLURM's allocation), before sharing with local ranks
    cuda: bool  # a CUDA device is there to train on
    bf16: bool = False  # the CUDA device computes in bf16 (Ampere and newer); meaningless without cuda
    simulated: bool = False  # described by MDFNET_MACHINE rather than detected

    @classmethod
    def detect(cls, environ: Mapping[str, str] = os.environ) -> "Machine":
        """This machine, or the one MDFNET_MACHINE describes (unset keys detected)."""
        spec = parse_spec(environ.get(ENV_VAR, ""))
        cpus = spec["cpus"] if "cpus" in spec else usable_cpus(environ)
        cuda = spec["cuda"] if "cuda" in spec else _cuda_available()
        if "bf16" in spec:
            bf16 = spec["bf16"]
        elif "cuda" in spec and not _cuda_available():
            bf16 = bool(cuda)  # a described CUDA machine: bf16-capable unless it says otherwise
        else:
            bf16 = bool(cuda) and _cuda_bf16()
        return cls(cpus=int(cpus), cuda=bool(cuda), bf16=bool(bf16) and bool(cuda), simulated=bool(spec))

    @property
    def cuda_usable(self) -> bool:
        """CUDA is described and really there (a simulated CUDA machine computes on the CPU)."""
        return self.cuda and _cuda_available()

    def cpus_per_process(self, environ: Mapping[str, str] = os.environ) -> int:
        """This process's share of the CPUs when the node runs LOCAL_WORLD_SIZE ranks."""
        local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, self.cpus // max(local_world, 1))

    def describe(self) -> str:
        gpu = "no CUDA" if not self.cuda else f"CUDA ({'bf16' if self.bf16 else 'no bf16'})"
        text = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}, {gpu}"
        if self.simulated:
            text += f" [{ENV_VAR}: simulated" + (
                "; computing on the CPU]" if self.cuda and not self.cuda_usable else "]"
            )
        return text


def parse_spec(text: str) -> dict[str, object]:
    """`cpus=16,cuda=true,bf16=false` as a dict; anything else fails naming the variable."""
    spec: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().lower()
        try:
            if not sep:
                raise ValueError("expected key=value")
            if key in spec:
                raise ValueError("given twice")
            if key == "cpus":
                spec[key] = int(value)
                if spec[key] < 1:
                    raise ValueError("must be >= 1")
            elif key in ("cuda", "bf16"):
                if value not in _TRUE | _FALSE:
                    raise ValueError("must be true or false")
                spec[key] = value in _TRUE
            else:
                raise ValueError("unknown key; use cpus, cuda, bf16")
        except ValueError as err:
            raise ValueError(f"{ENV_VAR}={text!r}: {part!r}: {err}") from None
    if spec.get("bf16") and spec.get("cuda") is False:
        raise ValueError(f"{ENV_VAR}={text!r}: bf16=true describes a CUDA device, but cuda=false")
    return spec


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def slurm_task_cpus(environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """The CPUs SLURM allocated to this process's task on this node, or None outside a SLURM job
    (or where it says nothing usable).

    In a task that `srun` started (submitit's jobs, one rank per GPU): `SLURM_CPUS_PER_TASK` (set
    when the job asked `--cpus-per-task`), else the job's CPUs on this node (`SLURM_CPUS_ON_NODE`)
    over the step's tasks there (`SLURM_STEP_TASKS_PER_NODE`, e.g. `4(x2),3`, read at this node's
    index `SLURM_NODEID`). In the batch script or an `salloc` shell, which own the job's CPUs on the
    node whatever its tasks ask: `SLURM_CPUS_ON_NODE`."""
    if "SLURM_JOB_ID" not in environ:
        return None
    on_node = _positive_int(environ.get("SLURM_CPUS_ON_NODE"))
    if not _in_srun_task(environ):
        return on_node
    per_task = _positive_int(environ.get("SLURM_CPUS_PER_TASK"))
    if per_task is not None:
        return per_task
    if on_node is None:
        return None
    node = _positive_int(environ.get("SLURM_NODEID")) or 0
    tasks = _tasks_on_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", ""), node)
    return max(1, on_node // (tasks or 1))


def _in_srun_task(environ: Mapping[str, str]) -> bool:
    """Whether this process runs in a job step that `srun` started: a numbered step. The batch
    script's step and an interactive `salloc` step are SLURM's special step ids (0xfffffff0 and up)
    or carry no step id."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    try:
        return 0 <= int(step) < 0xFFFFFFF0
    except ValueError:
        return False


def _tasks_on_node(text: str, node: int) -> Optional[int]:
    """Entry `node` of SLURM's compressed per-node list (`2(x3),1` is 2, 2, 2, 1), or None."""
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        value, _, repeat = part.partition("(x")
        count, times = _positive_int(value), _positive_int(repeat.rstrip(")")) if repeat else 1
        if count is None or times is None:
            return None
        counts.extend([count] * times)
    return counts[node] if node < len(counts) else None


def _positive_int(text: Optional[str]) -> Optional[int]:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def usable_cpus(environ: Mapping[str, str] = os.environ) -> int:
    """The CPUs this process may use: its affinity set, capped by its SLURM allocation."""
    affinity = _affinity_cpus()
    allocated = slurm_task_cpus(environ)
    return affinity if allocated is None else max(1, min(affinity, allocated))


def set_compute_threads(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """Torch's intra-op threads for this process, and why: `OMP_NUM_THREADS` where it is set (the
    user's, or the launcher's share for each of its workers; torch read it at start), else this
    process's share of the usable CPUs (never more than torch's own default). Called by every
    entry point before it computes."""
    import torch

    if _positive_int(environ.get("OMP_NUM_THREADS")) is not None:
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    local_world = _positive_int(environ.get("LOCAL_WORLD_SIZE")) or 1
    share = max(1, usable_cpus(environ) // local_world)
    allocated = slurm_task_cpus(environ)
    reason = "SLURM's allocation" if allocated is not None and allocated < _affinity_cpus() else "the affinity set"
    if local_world > 1:
        reason += f" shared by {local_world} local workers"
    threads = min(share, torch.get_num_threads())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads, reason


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_bf16() -> bool:
    """Native bf16 (compute capability 8.0+): torch's default also counts emulation, which would
    pick slow emulated bf16 over fp16 on a V100 or T4."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def real_cpus() -> int:
    """The CPUs this process may really use (thread counts follow these, not a described machine:
    a test describing 16 CPUs on 2 must not start 8 threads per rank)."""
    return usable_cpus()


def nvidia_gpus() -> list[str]:
    """The node's NVIDIA GPU device files (/dev/nvidia0, ...): there whatever CUDA_VISIBLE_DEVICES hides."""
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return sorted(f"/dev/{name}" for name in names if re.fullmatch(r"nvidia\d+", name))


def gpus_hidden_by_submitit_local(environ: Mapping[str, str] = os.environ) -> int:
    """How many of the node's GPUs Hydra's `submitit_local` launcher hid from this job. submitit's
    local executor sets CUDA_VISIBLE_DEVICES to GPUs 0..gpus_per_node-1, which is "" while
    `hydra.launcher.gpus_per_node` is unset: on a GPU workstation every job of such a sweep would
    train on the CPU without a word."""
    if environ.get("SUBMITIT_EXECUTOR") != "local" or environ.get("CUDA_VISIBLE_DEVICES") != "":
        return 0
    return len(nvidia_gpus())
