"""Several sweep processes on one Optuna study (issue 13): distinct draws, one directory per trial,
the study's budget counted once over all processes, and a trial whose sweep died taken over in place."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import REPO, quiet_evaluation
from mdfnet_hydra.summary import write_summary
from mdfnet_hydra.sweep_study import (
    HEARTBEAT_ATTR,
    OWNER_ATTR,
    STALE_AFTER_S,
    is_orphan,
    pid_space,
    reseed_for_trial,
    trial_directory_busy,
)

TINY = ("debug=fast", "data.synthetic.num_samples=300", "data.synthetic.image_size=32")
STUDY = ("hparams=random", "modality=clinical", "stage=stage1")
SWEEP = ("sweeps", "random-clinical-stage1")


def start_sweep(tmp_path, *overrides: str, log_name: str) -> tuple[subprocess.Popen, object]:
    """The real entry point as a user starts it, in its own process group (so a test can kill it)."""
    args = ["--multirun", *TINY, f"paths.root={tmp_path}", *STUDY, *overrides]
    log = (tmp_path / log_name).open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mdfnet_hydra.train", *args, *quiet_evaluation(args)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return process, log


def finish(process: subprocess.Popen, log, timeout: int = 600) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        log.close()
    return open(log.name).read()


def load_study(sweep_dir):
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage=storage)
    return optuna.load_study(study_name=name, storage=storage)


def job_dirs(sweep_dir):
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def launched(output: str) -> int:
    return sum(int(line.split("Launching ")[1].split()[0]) for line in output.splitlines() if "Launching " in line)


@pytest.mark.slow  # 16 s: two sweep processes at once
def test_two_processes_share_one_study(tmp_path):
    """Two identical sweep commands at once: 4 distinct trials in all, each run once in its own
    directory named by its Optuna trial number."""
    runs = [start_sweep(tmp_path, "hparams.n_trials=4", log_name=f"sweep{i}.log") for i in range(2)]
    outputs = [finish(*run) for run in runs]
    for (process, _), output in zip(runs, outputs):
        assert process.returncode == 0, output[-4000:]
    assert "database is locked" not in "".join(outputs)
    sweep_dir = tmp_path.joinpath(*SWEEP)
    trials = load_study(sweep_dir).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, "the study counts each trial once"
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4, "the processes drew distinct trials"
    assert [launched(o) for o in outputs] != [4, 0] and [launched(o) for o in outputs] != [0, 4], (
        "both processes ran trials of the study"
    )
    assert sum(launched(o) for o in outputs) == 4, "no trial was trained twice"

    dirs = job_dirs(sweep_dir)
    assert [int(d.name.split("_")[0]) for d in dirs] == [0, 1, 2, 3], [d.name for d in dirs]
    rows = {r["job"]: r for r in _summary(sweep_dir)}
    for trial, directory in zip(trials, dirs):
        overrides = (directory / ".hydra" / "overrides.yaml").read_text()
        assert f"phases.stage1.lr={trial.params['phases.stage1.lr']!r}" in overrides
        assert float(rows[directory.name]["val_auroc_mean"]) == pytest.approx(trial.value)

    # trial N draws the same start-up parameters whichever process asks for it
    sampler = optuna.samplers.RandomSampler()
    for trial in trials:
        reseed_for_trial(sampler, 42, trial.number)
        lr = sampler.sample_independent(None, None, "phases.stage1.lr", trial.distributions["phases.stage1.lr"])
        assert lr == trial.params["phases.stage1.lr"]


def _summary(sweep_dir):
    import csv

    with write_summary(sweep_dir).open() as handle:  # rebuilt: both processes wrote it when they ended
        return list(csv.DictReader(handle))


def test_an_interrupted_sweep_is_taken_over_in_place(tmp_path):
    """A sweep killed during its first trial: re-running the command runs that trial again (same
    number, parameters and directory) instead of a new one, and then the rest of the budget."""
    process, log = start_sweep(tmp_path, "hparams.n_trials=2", log_name="killed.log")
    sweep_dir = tmp_path.joinpath(*SWEEP)
    deadline = time.monotonic() + 300
    while not list(sweep_dir.glob("0_*/.hydra/overrides.yaml")):
        assert process.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    finish(process, log)
    (killed,) = load_study(sweep_dir).trials
    assert killed.state == TrialState.RUNNING
    first_dir = [d.name for d in job_dirs(sweep_dir)]

    process, log = start_sweep(tmp_path, "hparams.n_trials=3", log_name="rerun.log")  # and a larger budget
    output = finish(process, log)
    assert process.returncode == 0, output[-4000:]
    assert "Trial 0 was left running by a sweep that ended; running it again" in output
    trials = load_study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].params == killed.params
    dirs = [d.name for d in job_dirs(sweep_dir)]
    assert len(dirs) == 3 and dirs[0] == first_dir[0], (first_dir, dirs)


def test_a_running_trial_is_orphaned_only_when_its_sweep_is_gone():
    space = {"x": FloatDistribution(0, 1)}

    def running(owner, beat):
        attrs = {OWNER_ATTR: owner, HEARTBEAT_ATTR: beat}
        return optuna.trial.create_trial(
            state=TrialState.RUNNING, params={"x": 0.5}, distributions=space, system_attrs=attrs
        )

    now = time.time()
    me = {"host": "here", "pid": os.getpid(), "start": None, "pids": pid_space()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {"host": "here", "pid": int(dead.stdout), "start": None, "pids": pid_space()}
    assert not is_orphan(running(me, 0.0), now, host="here"), "a live process on this host owns it"
    assert is_orphan(running(gone, now), now, host="here"), "its process on this host ended"
    elsewhere = {"host": "node7", "pid": os.getpid(), "start": None}
    assert not is_orphan(running(elsewhere, now - 10), now, host="here"), "recent heartbeat from another host"
    assert is_orphan(running(elsewhere, now - STALE_AFTER_S - 1), now, host="here"), "no heartbeat for too long"
    # a container sharing this hostname but not its pids (host networking): judged by its heartbeat
    container = {"host": "here", "pid": int(dead.stdout), "start": None, "pids": "other-boot:4026531836"}
    assert not is_orphan(running(container, now - 10), now, host="here"), "its pid means nothing here"
    assert is_orphan(running(container, now - STALE_AFTER_S - 1), now, host="here")
    legacy = optuna.trial.create_trial(state=TrialState.RUNNING, params={"x": 0.5}, distributions=space)
    assert is_orphan(legacy, now, host="here"), "left running by a sweeper that recorded no owner"


def test_a_trial_whose_job_still_holds_its_directory_is_not_taken_over(tmp_path):
    """Its sweep process died but its (SLURM) job runs on: running it again would collide with it."""
    lock = tmp_path / "3_0123abcd" / ".mdfnet" / "lock"
    lock.parent.mkdir(parents=True)
    with lock.open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert trial_directory_busy(tmp_path, 3)
        assert not trial_directory_busy(tmp_path, 4)
    assert not trial_directory_busy(tmp_path, 3), "the job ended: the trial can be run again"


@pytest.mark.parametrize(
    "make",
    [lambda: optuna.samplers.RandomSampler(seed=7), lambda: optuna.samplers.TPESampler(seed=7, n_startup_trials=10)],
)
def test_per_trial_seeds_make_draws_independent_of_the_process(make):
    """Two samplers (two processes) taking turns on one study draw what one sampler alone draws."""
    space = {"a": FloatDistribution(1e-5, 1e-2, log=True), "b": FloatDistribution(0.2, 0.4)}

    def draw(study, sampler, number):
        trial = study.ask()
        assert trial.number == number
        reseed_for_trial(sampler, 7, trial.number)
        return {name: trial._suggest(name, dist) for name, dist in space.items()}

    alone = optuna.create_study(sampler=make())
    expected = [draw(alone, alone.sampler, n) for n in range(4)]
    storage = optuna.storages.InMemoryStorage()
    first, second = (
        optuna.create_study(study_name="s", storage=storage, sampler=make(), load_if_exists=True) for _ in range(2)
    )
    turns = [draw(study, study.sampler, n) for n, study in enumerate([first, second, second, first])]
    assert turns == expected
    assert len({tuple(d.values()) for d in expected}) == 4


# ----------------------------------------------------------------------------- the sweeper's loop, in process
class RecordingLauncher:
    """Stands in for Hydra's launcher: records (first job number, overrides) and returns a value;
    `during` runs while the jobs are "in flight" (another process working on the same study)."""

    def __init__(self, during=None):
        self.calls: list[tuple[int, list[list[str]]]] = []
        self.during = during

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.calls.append((initial_job_idx, [list(o) for o in job_overrides]))
        if self.during is not None:
            during, self.during = self.during, None
            during()
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=0.5) for o in job_overrides]


def study_sweeper(tmp_path, launcher, space: dict, sampler, n_trials: int, n_jobs: int):
    from omegaconf import OmegaConf

    from mdfnet_hydra.sweep_study import SharedStudySweeperImpl

    impl = SharedStudySweeperImpl(
        sampler,
        "maximize",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        "s",
        n_trials,
        n_jobs,
        0.0,
        None,
        OmegaConf.create(space),
        seed=3,
    )
    impl.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, **{name: None for name in space}})
    impl.launcher, impl.hydra_context, impl.sweep_dir = launcher, object(), str(tmp_path)
    return impl


@pytest.mark.parametrize("preset", ["random", "grid"])
def test_a_sweeper_counts_the_trials_another_one_runs(tmp_path, preset):
    """Sweeper B starts while sweeper A's first batch runs: together they ask for exactly n_trials,
    each launch's job numbers are its trials' numbers, and no parameters repeat."""
    import functools

    space = {"x": "interval(0, 1)"} if preset == "random" else {"x": "choice(1, 2, 3, 4, 5, 6, 7)"}

    def make_sampler():
        if preset == "random":
            return optuna.samplers.RandomSampler()
        return functools.partial(optuna.samplers.GridSampler, seed=None)

    second = RecordingLauncher()
    first = RecordingLauncher(during=lambda: study_sweeper(tmp_path, second, space, make_sampler(), 5, 2).sweep([]))
    study_sweeper(tmp_path, first, space, make_sampler(), 5, 2).sweep([])
    assert [(idx, len(jobs)) for idx, jobs in first.calls] == [(0, 2)]
    assert [(idx, len(jobs)) for idx, jobs in second.calls] == [(2, 2), (4, 1)]
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert len({t.params["x"] for t in trials}) == 5
    jobs = [o for _, batch in first.calls + second.calls for o in batch]
    assert sorted(jobs) == sorted([[f"x={t.params['x']}"] for t in trials])


def test_a_sweeper_takes_over_a_trial_whose_process_ended(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    orphan = study.ask({"x": FloatDistribution(0, 1)})
    study._storage.set_trial_system_attr(
        orphan._trial_id, OWNER_ATTR, {"host": socket.gethostname(), "pid": int(dead.stdout), "start": None}
    )
    launcher = RecordingLauncher()
    study_sweeper(tmp_path, launcher, {"x": "interval(0, 1)"}, optuna.samplers.RandomSampler(), 2, 2).sweep([])
    x = orphan.params["x"]
    assert launcher.calls[0] == (0, [[f"x={x}"]]), "the orphan first, as itself: number, parameters"
    assert [(idx, len(jobs)) for idx, jobs in launcher.calls] == [(0, 1), (1, 1)]
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and trials[0].params == {"x": x}
