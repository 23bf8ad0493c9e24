"""The adapter directory on disk (fastpeft.methods.files): a save replaces both files as one, also when its writer is
killed at any step or another writer saves at the same time; bad files and bad paths are clear errors."""
import json
import os
import random
import shutil
import signal
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpeft import (BottleneckConfig, DiffPruningConfig, LoraConfig, inject, load_adapter, project_to_density,
                            save_adapter)
from fastpeft.methods import files
from fastpeft.methods.lora.targets import lora_layers
from tests.model_cases import (assert_unchanged, gpt2_batch, hidden, minilm, randomize_adapter, snapshot,
                               tiny_gpt2)
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

OLD, NEW = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]), LoraConfig(r=4, lora_alpha=32,
                                                                                   target_modules=["c_attn"])


def lora_model(config: LoraConfig, seed: int):
    model = inject(tiny_gpt2(), config)
    randomize_adapter(model, seed=seed)
    return model


def loaded_output(directory):
    return hidden(load_adapter(tiny_gpt2(), directory), gpt2_batch())


def temporaries(parent) -> list[str]:
    return [name for name in os.listdir(parent) if name.startswith(files.TMP_PREFIX)]


# --- a writer killed at every step ---------------------------------------------------------------------------------
def before_each_step(hook, exchange: bool) -> None:
    """In a forked writer: call `hook()` before each file-system step of a save (a rename, replace, link, exchange,
    fsync or the final rmtree); without `exchange`, the file-by-file fallback of systems that lack it."""
    def hooked(fn):
        def call(*args, **kwargs):
            hook()
            return fn(*args, **kwargs)
        return call
    for name in ("rename", "replace", "link"):
        setattr(files.os, name, hooked(getattr(os, name)))  # the fork's own os module: the parent's is apart
    files._exchange = hooked(files._exchange if exchange else lambda a, b: False)
    files._fsync = hooked(files._fsync)
    files.shutil.rmtree = hooked(shutil.rmtree)


def killed(pid: int) -> bool:
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def save_killed_at(step: int, model, directory, exchange: bool) -> bool:
    """Fork a writer that saves `model` into `directory` and SIGKILLs itself before its `step`-th file-system call.
    False when the save finished before that step (every step has been tried)."""
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            calls = []

            def count_and_kill():
                calls.append(1)
                if len(calls) == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            before_each_step(count_and_kill, exchange)
            save_adapter(model, directory)
        finally:
            os._exit(0)
    return killed(pid)


def slow_writer(model, directory, exchange: bool) -> int:
    """Fork a writer that saves `model` into `directory`, pausing PAUSE before each file-system step so that random
    kill times spread over the steps; returns its pid once it starts the save."""
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            before_each_step(lambda: time.sleep(PAUSE), exchange)
            os.write(go, b"!")
            save_adapter(model, directory)
        finally:
            os._exit(0)
    os.close(go)
    os.read(ready, 1)
    os.close(ready)
    return pid


def save_killed_after(delay: float, model, directory, exchange: bool) -> bool:
    """A slow writer SIGKILLed `delay` seconds into its save; False when the save finished first."""
    pid = slow_writer(model, directory, exchange)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # a writer that has exited is a zombie until waited for: the kill is harmless
    return killed(pid)


def state_after_kill(directory, want_old, want_new, exchange: bool) -> str:
    """What a load of `directory` finds: the "old" or the "new" adapter, or ("refused", file-by-file only) the new
    weights beside the old config; never anything else."""
    try:
        out = loaded_output(directory)
    except ValueError as e:
        assert not exchange and "a save into this directory was interrupted" in str(e)
        return "refused"
    assert torch.equal(out, want_old) or torch.equal(out, want_new), "the directory loads as neither adapter"
    return "old" if torch.equal(out, want_old) else "new"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "file-by-file"])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, exchange):
    """With the atomic exchange, every kill leaves the old adapter or the new one. Without it (other systems), a kill
    between the two renames leaves new weights beside the old config: that pair is refused, never loaded with the
    old config's scaling (which is what happened before)."""
    old, new = lora_model(OLD, seed=1), lora_model(NEW, seed=2)
    directory = tmp_path / "adapter"
    want_old, want_new = hidden(old, gpt2_batch()), hidden(new, gpt2_batch())
    seen, step = set(), 1
    while True:
        save_adapter(old, directory)
        assert not temporaries(tmp_path), "the save removes what killed writers left"
        if not save_killed_at(step, new, directory, exchange):
            break
        seen.add(state_after_kill(directory, want_old, want_new, exchange))
        step += 1
    assert torch.equal(loaded_output(directory), want_new)
    assert seen == ({"old", "new"} if exchange else {"old", "refused", "new"})


PAUSE = 0.004  # seconds a randomly killed writer waits before each file-system step
KILLS = 24


def test_writers_killed_at_random_moments_leave_one_adapter_and_the_next_load_cleans_up(tmp_path):
    """KILLS writers (either swap) killed while replacing the old adapter, each at a seeded random moment: half at a
    random time into the save, half before a random file-system step. Every kill leaves the old or the new adapter
    (or, file by file, the refused torn pair), and the next load removes the temporary directory the writer left."""
    old, new = lora_model(OLD, seed=1), lora_model(NEW, seed=2)
    directory = tmp_path / "adapter"
    want_old, want_new = hidden(old, gpt2_batch()), hidden(new, gpt2_batch())
    rng = random.Random(0)
    start = time.perf_counter()
    for exchange in (True, False):  # how long a slow writer's save takes here, from its start to its exit
        assert not killed(slow_writer(new, tmp_path / "timed", exchange))
    span = (time.perf_counter() - start) / 2
    kills, seen = 0, set()
    for _ in range(3 * KILLS):
        if kills == KILLS:
            break
        save_adapter(old, directory)
        exchange = rng.random() < 0.5
        if rng.random() < 0.5:
            was_killed = save_killed_after(rng.uniform(0, span), new, directory, exchange)
        else:
            was_killed = save_killed_at(rng.randint(1, 7), new, directory, exchange)
        if was_killed:
            kills += 1
            seen.add(state_after_kill(directory, want_old, want_new, exchange))
            assert not temporaries(tmp_path), "the load removes what the killed writer left"
    assert kills == KILLS, f"only {kills} writers were killed before they finished"
    assert seen == {"old", "new", "refused"}


def marked(k: int):
    """A LoRA GPT-2 whose config (alpha k) and weights (B filled with k) tell which save a read came from."""
    model = inject(tiny_gpt2(), LoraConfig(r=2, lora_alpha=k, target_modules=["c_attn"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].fill_(k)
    return model


def assert_one_save(directory) -> None:
    saved = files.read_adapter(directory)
    b = saved.tensors["base_model.model.h.0.attn.c_attn.lora_B.weight"]
    assert saved.config["lora_alpha"] == b[0, 0].item(), "a config beside another save's weights"


def test_threads_saving_into_one_directory_never_mix(tmp_path):
    """Two writers and a reader: every read pairs a config with its own weights (alpha k with B filled with k)."""
    directory = tmp_path / "adapter"
    models = {k: marked(k) for k in (1, 2)}
    save_adapter(models[1], directory)
    errors = []

    def write(k):
        try:
            for _ in range(25):
                save_adapter(models[k], directory)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    writers = [threading.Thread(target=write, args=(k,)) for k in (1, 2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads < 20:
        assert_one_save(directory)
        reads += 1
    for w in writers:
        w.join()
    assert not errors and not temporaries(tmp_path)


def test_two_writer_processes_racing_one_killed_never_mix(tmp_path):
    """Two writer processes save into one directory over and over while this process reads it; the first, saving
    until it dies, is SIGKILLed at a seeded random moment of the race. Every read pairs a config with its own weights,
    and no temporary directory is left once the race is over."""
    directory = tmp_path / "adapter"
    save_adapter(marked(1), directory)
    pids = []
    for k, saves in ((1, None), (2, 40)):
        model = marked(k)
        pid = os.fork()
        if pid == 0:  # a writer
            try:
                for _ in range(saves or 10**9):
                    save_adapter(model, directory)
            finally:
                os._exit(0)
        pids.append(pid)
    endless, finite = pids
    kill_at = time.perf_counter() + random.Random(1).uniform(0.05, 0.3)
    done = 0
    while not done:
        assert_one_save(directory)
        if time.perf_counter() > kill_at:
            os.kill(endless, signal.SIGKILL)
        done, status = os.waitpid(finite, os.WNOHANG)
    os.kill(endless, signal.SIGKILL)  # if the other writer finished first
    assert killed(endless) and os.WIFEXITED(status)
    assert_one_save(directory)
    assert not temporaries(tmp_path)


# --- what a save keeps and cleans --------------------------------------------------------------------------------
def test_a_save_keeps_the_directorys_other_files_and_a_symlink(tmp_path):
    real = tmp_path / "real"
    save_adapter(lora_model(OLD, seed=1), real)
    (real / "trainer_state.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real)
    save_adapter(lora_model(NEW, seed=2), link)
    assert link.is_symlink() and (real / "trainer_state.json").read_text() == "{}"
    assert json.loads((real / "adapter_config.json").read_text())["lora_alpha"] == 32


def test_a_save_removes_temporaries_of_dead_writers_only(tmp_path):
    host = socket.gethostname()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is no longer running
    dead = tmp_path / f"{files.TMP_PREFIX}{host}-{pid}-abc"
    alive = tmp_path / f"{files.TMP_PREFIX}{host}-{os.getpid()}-def"
    other_host = tmp_path / f"{files.TMP_PREFIX}elsewhere-{pid}-ghi"
    for d in (dead, alive, other_host):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    save_adapter(lora_model(OLD, seed=1), tmp_path / "adapter")
    assert not dead.exists() and alive.exists() and other_host.exists()


# --- bad values, bad paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_on_load_and_on_save(tmp_path, bad):
    good = lora_model(OLD, seed=1)
    save_adapter(good, tmp_path / "good")
    path = tmp_path / "good" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.h.1.attn.c_attn.lora_B.weight"][3, 1] = bad
    save_file(tensors, tmp_path / "bad.safetensors")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "adapter_config.json").write_bytes((tmp_path / "good" / "adapter_config.json").read_bytes())
    os.replace(tmp_path / "bad.safetensors", bad_dir / "adapter_model.safetensors")
    for model in (tiny_gpt2(), lora_model(OLD, seed=3)):  # a fresh model and one whose adapter would be overwritten
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"non-finite values .*h\.1\.attn\.c_attn\.lora_B\.weight"):
            load_adapter(model, bad_dir)
        assert_unchanged(model, before)
    files_before = path.read_bytes()
    with torch.no_grad():
        next(iter(lora_layers(good)))[1].lora_A["default"][0, 0] = bad
    with pytest.raises(ValueError, match=r"refusing to save non-finite .*h\.0\.attn\.c_attn\.lora_A\.weight"):
        save_adapter(good, tmp_path / "good")
    assert path.read_bytes() == files_before


def set_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("field", ["lora_alpha", "r", "lora_dropout", "use_rslora", "bias", "init_lora_weights"])
def test_null_lora_fields_are_errors_not_defaults(tmp_path, field):
    save_adapter(lora_model(NEW, seed=1), tmp_path)
    set_config(tmp_path, **{field: None})
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} is null"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_null_rank_pattern_means_no_pattern_as_in_peft(tmp_path):
    model = lora_model(NEW, seed=1)
    save_adapter(model, tmp_path)
    set_config(tmp_path, rank_pattern=None, alpha_pattern=None)
    assert torch.equal(loaded_output(tmp_path), hidden(model, gpt2_batch()))


@pytest.mark.parametrize("base, config, field", [(minilm, BottleneckConfig(bottleneck=8), "activation"),
                                                 (minilm, BottleneckConfig(bottleneck=8), "placement"),
                                                 (tiny_gpt2, DiffPruningConfig(target_modules=["c_fc"], density=0.1),
                                                  "density")])
def test_null_fields_of_other_methods_are_errors(tmp_path, base, config, field):
    model = inject(base(), config)
    if isinstance(config, DiffPruningConfig):
        project_to_density(model)
    save_adapter(model, tmp_path)
    set_config(tmp_path, **{field: None})
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field} is null"):
        load_adapter(base(), tmp_path)


def test_an_unknown_method_is_an_error_not_lora(tmp_path):
    save_adapter(lora_model(NEW, seed=1), tmp_path)
    set_config(tmp_path, method="ia3")
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown method 'ia3'; fastpeft reads"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("directory, error, message", [
    ("", ValueError, r"directory must be a non-empty path, got ''"),
    ("  ", ValueError, r"directory must be a non-empty path, got '  '"),
    (None, TypeError, r"directory must be a path \(str or os.PathLike\), got NoneType"),
    (3, TypeError, r"directory must be a path \(str or os.PathLike\), got int"),
])
def test_bad_directory_arguments(directory, error, message):
    model = lora_model(OLD, seed=1)
    with pytest.raises(error, match=message):
        save_adapter(model, directory)
    with pytest.raises(error, match=message):
        load_adapter(tiny_gpt2(), directory)


def test_saving_a_model_on_the_meta_device_is_a_clear_error(tmp_path):
    model = lora_model(OLD, seed=1).to("meta")
    with pytest.raises(ValueError, match=r"cannot save adapter weights on the meta device .*lora_A\.weight"):
        save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not temporaries(tmp_path)
