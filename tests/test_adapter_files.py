"""The adapter directory on disk (fastpeft.methods.files): a save replaces both files as one, also when its writer is
killed at any step or another writer saves at the same time; bad files and bad paths are clear errors."""
import json
import os
import signal
import socket
import threading

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
STEPS = ("rename", "replace", "link", "_exchange", "_fsync")  # what a save does to the file system, in files' names


def save_killed_at(step: int, model, directory, exchange: bool) -> bool:
    """Fork a writer that saves `model` into `directory` and SIGKILLs itself before its `step`-th file-system call.
    False when the save finished before that step (every step has been tried)."""
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            calls = []

            def killing(fn):
                def call(*args, **kwargs):
                    calls.append(fn)
                    if len(calls) == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*args, **kwargs)
                return call
            for name in ("rename", "replace", "link"):
                setattr(files.os, name, killing(getattr(os, name)))  # the fork's own os module: the parent's is apart
            files._exchange = killing(files._exchange if exchange else lambda a, b: False)
            files._fsync = killing(files._fsync)
            save_adapter(model, directory)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


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
        try:
            out = loaded_output(directory)
            state = "old" if torch.equal(out, want_old) else "new" if torch.equal(out, want_new) else "mixed"
        except ValueError as e:
            assert not exchange and "a save into this directory was interrupted" in str(e)
            state = "refused"
        assert state != "mixed", f"killed at step {step}: the directory loads as neither adapter"
        seen.add(state)
        step += 1
    assert torch.equal(loaded_output(directory), want_new)
    assert seen == ({"old", "new"} if exchange else {"old", "refused", "new"})


def test_threads_saving_into_one_directory_never_mix(tmp_path):
    """Two writers and a reader: every read pairs a config with its own weights (alpha k with B filled with k)."""
    directory = tmp_path / "adapter"
    models = {}
    for k in (1, 2):
        models[k] = inject(tiny_gpt2(), LoraConfig(r=2, lora_alpha=k, target_modules=["c_attn"]))
        with torch.no_grad():
            for _, layer in lora_layers(models[k]):
                layer.lora_B["default"].fill_(k)
    save_adapter(models[1], directory)
    key = "base_model.model.h.0.attn.c_attn.lora_B.weight"
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
        saved = files.read_adapter(directory)
        assert saved.config["lora_alpha"] == saved.tensors[key][0, 0].item(), "a config beside another save's weights"
        reads += 1
    for w in writers:
        w.join()
    assert not errors and not temporaries(tmp_path)


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
