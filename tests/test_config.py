"""Configs: every shipped config validates; bad values fail early, naming the field."""

import glob
import importlib.util
import os
import subprocess
import sys

import jax
import pytest
from conftest import biomedclip_file, make_tiny_config

from configs.common import parse_arg
from usfm_jax.cli import load_config
from usfm_jax.config_validation import ConfigError, validate
from usfm_jax.finetune.validation import validate_finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.py")))
CONFIGS = [c for c in CONFIGS if os.path.basename(c) not in ("__init__.py", "common.py")]


def _load(path: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_validates(path, tmp_path):
    config = _load(path)
    if "finetune" in path:
        validate_finetune(config, num_devices=8)
        assert config.task == os.path.basename(path)[:-3]
        return
    if config.representation.enabled:  # URFM: the teacher file is the user's to give
        with pytest.raises(ConfigError, match=r"config\.teacher\.path='': .* needs a teacher"):
            validate(config, num_devices=8)
        teacher, _, _ = biomedclip_file(tmp_path, width=64, depth=1, heads=2, proj=32)
        config.teacher.path = str(teacher)
        demo_scale = _load(path, "demo")
        demo_scale.teacher.path = str(teacher)
        validate(demo_scale, num_devices=1)
    validate(config, num_devices=8)
    if "ablations" in path:
        demo_scale = _load(path, "demo")
        validate(demo_scale, num_devices=1)
        assert demo_scale.image_size == (64, 64)


def test_ablations_change_what_they_name():
    ablations = os.path.join(ROOT, "configs", "ablations")
    base = _load(os.path.join(ablations, "dual.py"))
    assert _load(os.path.join(ablations, "spatial_only.py")).frequency.enabled is False
    assert _load(os.path.join(ablations, "frequency_only.py")).spatial.enabled is False
    assert _load(os.path.join(ablations, "mask_token.py")).spatial.rule == "mask_token"
    mfm = _load(os.path.join(ablations, "mfm_low_high_pass.py"))
    assert mfm.frequency.kind == "low_high_pass" and base.frequency.kind == "band_stop"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"spatial.ratio": 1.0}, r"config\.spatial\.ratio=1\.0"),
        ({"probe.every": 5, "probe.k": 0}, r"config\.probe\.k=0"),
        ({"mesh.fsdp": 0}, r"config\.mesh\.fsdp=0: expected >= 1, or -1 for the rest"),
        ({"spatial.ratio": -0.2}, r"config\.spatial\.ratio"),
        ({"image_size": (40, 48)}, r"config\.image_size=\(40, 48\).*patch_size=16"),
        ({"frequency.increase_factor": 0.1}, r"config\.frequency:.*increase_factor"),
        ({"frequency.base_bw": 40}, r"config\.frequency:.*base_bw"),
        ({"frequency.ratio": 0.05}, r"config\.frequency:.*ratio"),
        ({"spatial.mask_patch_size": 24}, r"config\.spatial\.mask_patch_size=24"),
        ({"model.size": "gigantic"}, r"config\.model\.size='gigantic'"),
        ({"model.dtype": "float8"}, r"config\.model\.dtype"),
        ({"optimizer.warmup_steps": 100}, r"config\.optimizer\.warmup_steps"),
        ({"objective.combine": "sometimes"}, r"config\.objective:.*combine"),
        (
            {"teacher.targets": "caches/biomedclip"},  # representation.enabled stays False
            r"config\.teacher\.targets='caches/biomedclip': is set, but "
            r"representation\.enabled=False",
        ),
        (
            {"objective.combine": "split", "frequency.enabled": False},
            r"config\.objective: combine='split' shares .* only spatial is enabled",
        ),
        ({"batch_size": 12}, r"config\.batch_size=12.*8 devices"),
        ({"batch_size": 12, "mesh.data": 1, "mesh.fsdp": 8}, r"config\.batch_size=12.*8 devices"),
        ({"optimizer.clip_norm": -1.0}, r"config\.optimizer\.clip_norm=-1\.0"),
        ({"optimizer.b2": 1.0}, r"config\.optimizer\.b2=1\.0: expected \[0, 1\)"),
        ({"objective.spatial_weight": -1.0}, r"config\.objective\.spatial_weight"),
        ({"spatial.ratio": 0.0}, r"config\.spatial\.ratio=0\.0: masks nothing"),
        ({"model.out_chans": 3}, r"config\.model\.out_chans=3"),
        ({"model.depth": 0}, r"config\.model\.depth=0"),
        ({"model.head": "transformer", "model.decoder.width": 100}, r"model\.decoder\.width"),
        ({"num_preview_images": 0}, r"config\.num_preview_images=0"),
        ({"num_preview_images": 20}, r"num_preview_images=20: expected \[1, batch_size=16\]"),
        ({"data.source": "dicom"}, r"config\.data\.source='dicom'"),
        ({"objective.norm_pix": True, "objective.frequency_fft_weight": 1.0}, r"norm_pix"),
        ({"model.attention": "flash"}, r"config\.model\.attention='flash'"),
        ({"model.attention": "cudnn"}, r"config\.model\.attention='cudnn'.*NVIDIA GPU.*'xla'"),
        ({"model.attention": "pallas"}, r"config\.model\.attention='pallas'.*NVIDIA GPU.*'xla'"),
        (
            {"model.mlp": "cublas"},
            r"config\.model\.mlp='cublas': expected one of \('xla', 'pallas', 'pallas_backward'\)",
        ),
        ({"model.mlp": "pallas"}, r"config\.model\.mlp='pallas'.*NVIDIA GPU.*'xla'"),
        (
            {"model.mlp": "pallas_backward"},
            r"config\.model\.mlp='pallas_backward'.*NVIDIA GPU.*'xla'",
        ),
        (
            {"model.norm": "apex"},
            r"config\.model\.norm='apex': expected one of \('auto', 'xla', 'pallas'\)",
        ),
        ({"model.norm": "pallas"}, r"config\.model\.norm='pallas'.*NVIDIA GPU.*'xla'"),
        ({"seed": -1}, r"config\.seed=-1: expected an int in \[0, 2\*\*32\)"),
        ({"seed": 2**64}, r"config\.seed=18446744073709551616: expected an int in \[0, 2\*\*32"),
        (
            {"frequency.kind": "low_high_pass", "frequency.radius": 1000.0},
            r"config\.frequency: radius=1000\.0 is beyond the 32x48 spectrum's farthest frequency "
            r"\(28\.8 bins",
        ),
        (
            {"checkpoint.every": 300, "checkpoint.keep_every": 1000},
            r"config\.checkpoint\.keep_every=1000: must be a multiple of checkpoint\.every=300",
        ),
        (
            {"data.tfds_dir": "/data/tfds/liver/1.0.0"},  # data.source stays "synthetic"
            r"config\.data\.tfds_dir='/data/tfds/liver/1\.0\.0': is set, but "
            r"data\.source='synthetic' .* add --config\.data\.source=tfds",
        ),
    ],
)
def test_invalid_settings_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_tiny_config(**overrides), num_devices=8)


def test_keep_every_follows_every():
    config = make_tiny_config(**{"checkpoint.every": 3})
    assert config.checkpoint.keep_every == 30  # a multiple of every unless set otherwise
    validate(config, num_devices=8)


def test_pallas_attention_is_checked_against_the_token_count():
    """For a GPU (``backend``, as an ahead-of-time compile for one names it), 'pallas' takes
    images of up to 256 tokens (224 px with 16-px patches: 197; not 384 px: 577) and heads up
    to 64 wide."""
    validate(make_tiny_config(**{"model.attention": "pallas"}), num_devices=8, backend="gpu")
    big = make_tiny_config(**{"model.attention": "pallas", "image_size": (384, 384)})
    with pytest.raises(ConfigError, match=r"up to 256 tokens.*\(384, 384\) makes 577"):
        validate(big, num_devices=8, backend="gpu")
    wide = make_tiny_config(**{"model.attention": "pallas", "model.width": 160})  # heads of 80
    with pytest.raises(ConfigError, match=r"heads up to 64 wide.*are 80 \(width 160, 2 heads\)"):
        validate(wide, num_devices=8, backend="gpu")


def test_gpu_kernels_are_accepted_for_a_gpu():
    """The fused MLP and LayerNorm have no size limits: for a GPU any encoder takes them; cuDNN
    attention takes half-precision compute only."""
    validate(make_tiny_config(**{"model.mlp": "pallas", "model.width": 160}), 8, backend="gpu")
    validate(make_tiny_config(**{"model.norm": "pallas", "model.width": 160}), 8, backend="gpu")
    cudnn = {"model.attention": "cudnn", "model.dtype": "bfloat16"}
    validate(make_tiny_config(**cudnn), num_devices=8, backend="gpu")
    with pytest.raises(ConfigError, match=r"bf16 / fp16 compute \(backend 'gpu'"):
        validate(make_tiny_config(**{"model.attention": "cudnn"}), 8, backend="gpu")


def test_configs_are_locked():
    config = make_tiny_config()
    with pytest.raises(AttributeError, match="ratoi"):
        config.spatial.ratoi = 0.5


@pytest.mark.parametrize(
    "spec",
    ["configs/pretrain/demo.py", "configs/pretrain/usfm_vitb16.py", "configs/finetune/segment.py"],
)
def test_warmup_follows_total_steps(spec):
    config = load_config(spec)
    config.total_steps = 40  # what --config.total_steps=40 does
    assert config.optimizer.warmup_steps == 4
    _validate(config)
    if "demo" in spec:
        assert config.image_every == 10
    config.optimizer.warmup_steps = 7  # set explicitly: it stays
    config.total_steps = 80
    assert config.optimizer.warmup_steps == 7


def _validate(config) -> None:
    (validate_finetune if "task" in config else validate)(config, 1)


def test_running_out_of_device_memory_is_one_line_with_the_remedies():
    import jax.numpy as jnp

    from usfm_jax.cli import exit_if_out_of_memory

    with pytest.raises(jax.errors.JaxRuntimeError) as error:  # a real XLA allocation failure
        jax.jit(lambda: jnp.zeros((2**40,), jnp.float32))().block_until_ready()
    with pytest.raises(SystemExit) as stop:
        exit_if_out_of_memory(error.value)
    message = str(stop.value)
    assert message.startswith("error: RESOURCE_EXHAUSTED: Out of memory allocating 43980")
    assert "config.batch_size" in message and "grad_accum_steps" in message
    assert "\n" not in message
    exit_if_out_of_memory(ValueError("something else"))  # not memory: returns, the caller raises


def test_parse_arg():
    assert parse_arg("steps=5,demo", steps=1, demo=False).to_dict() == {"steps": 5, "demo": True}
    with pytest.raises(ValueError, match="'stpes' is not one of"):
        parse_arg("stpes=5", steps=1)


def _cli(*args: str, config: str = "configs/pretrain/demo.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "usfm_jax.train", "--config", config]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "config, args, error",
    [
        ("configs/pretrain/nope.py", [], "config file 'configs/pretrain/nope.py' does not exist"),
        (
            "configs/pretrain/demo.py:stepz=5",
            [],
            "--config configs/pretrain/demo.py:stepz=5: config argument 'stepz' is not one of "
            "['steps']",
        ),
        (
            "configs/pretrain/demo.py",
            ["--stop_after=0"],
            "flag --stop_after=0: 0 is not a positive",
        ),
        ("configs/pretrain/demo.py", ["--workdir=README.md"], "--workdir README.md is a file"),
        (
            "configs/pretrain/demo.py",
            ["--workdir=README.md/run"],
            f"--workdir README.md/run: {ROOT}/README.md is a file, not a directory",
        ),
        ("configs/pretrain/demo.py", ["stray"], "unexpected arguments ['stray']: flags take"),
    ],
    ids=["missing file", "bad argument", "bad flag", "workdir is a file", "under a file", "stray"],
)
def test_cli_mistakes_get_one_line(tmp_path, config, args, error):
    args = (
        args if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}", *args]
    )
    result = _cli(*args, config=config)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {error}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "module, args, error",
    [
        (
            "usfm_jax.teacher_cache",
            ["--config=configs/pretrain/urfm_vitb16.py:demo", "--config.teacher.layr=x"],
            'invalid --config override: layr Did you mean "layer"',
        ),
        ("usfm_jax.export", ["--checkpoint=runs/x", "--ema=maybe"], "flag --ema=maybe: value"),
        (
            "usfm_jax.teacher_cache",
            ["--config=configs/finetune/classify.py"],
            "--config is not a pre-training config (it has no config.objective); it is a "
            "fine-tuning config: run it with python -m usfm_jax.finetune",
        ),
        (
            "usfm_jax.teacher_cache",
            ["--config=configs/pretrain/urfm_vitb16.py:demo", "--batch=-8"],
            "flag --batch=-8: -8 is not a positive integer",
        ),
    ],
)
def test_other_entry_points_give_one_line_for_a_bad_flag(tmp_path, module, args, error):
    cmd = [sys.executable, "-m", module, *args, f"--out={tmp_path}/out"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {error}"), result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(f"{tmp_path}/out")


def test_ctrl_c_ends_an_entry_point_with_one_line_and_status_130(tmp_path):
    program = tmp_path / "interrupted.py"
    program.write_text(
        "import atexit, os, signal, time\n"
        "from usfm_jax.cli import run_program\n"
        "atexit.register(lambda: print('exit handlers ran', flush=True))\n"
        "def main(argv):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, during the program's work\n"
        "    time.sleep(60)\n"
        "run_program(main, lambda: 'nothing was written')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True,
                            timeout=60, env=env, check=False)  # fmt: skip
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["interrupted (Ctrl-C): nothing was written"]
    assert result.stdout == "exit handlers ran\n"


def test_ctrl_c_during_a_conversion_is_one_line(tmp_path):
    """convert's command line (argparse, not absl) ends the same way."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (
        "import os, runpy, signal, sys\n"
        "import usfm_jax.convert\n"
        "def interrupted(*args, **kwargs):  # Ctrl-C, during the conversion\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "usfm_jax.convert.checkpoint_to_torch = interrupted\n"
        "sys.argv = ['convert', 'to-torch', '--checkpoint', 'w', '--format', 'timm-vit', "
        f"'--out', '{tmp_path}/x.safetensors']\n"
        "runpy.run_module('usfm_jax.convert.__main__', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env, check=False)  # fmt: skip
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == [
        "interrupted (Ctrl-C): --out, if it was made, is incomplete: remove it before running "
        "the command again"
    ]


def test_a_config_of_the_other_kind_is_named_before_its_fields_are_read():
    pretrain = make_tiny_config()
    finetune = load_config("configs/finetune/classify.py")
    with pytest.raises(ConfigError, match=r"is a fine-tuning config: .*usfm_jax\.finetune$"):
        validate(finetune)
    with pytest.raises(ConfigError, match=r"is a pre-training config: .*usfm_jax\.train$"):
        validate_finetune(pretrain)
    with finetune.unlocked():
        del finetune["task"]
    with pytest.raises(ConfigError, match=r"not a pre-training config .* it is of neither kind"):
        validate(finetune)


@pytest.mark.parametrize(
    "name, text, error",
    [
        ("syntax.py", "def get_config(:\n", "SyntaxError at {path}:1: invalid syntax"),
        ("imports.py", "import no_such_module\n", "ModuleNotFoundError: No module named"),
        ("image.png", "\x89PNG\n", "SyntaxError at {path}:1:"),
        ("none.py", "def get_config():\n    pass\n", "get_config() returned None"),
        ("empty.py", "CONFIG = {}\n", "--config {path}: defines no get_config() function"),
    ],
    ids=["syntax error", "failed import", "not python", "no config", "no get_config"],
)
def test_a_config_file_that_cannot_load_is_one_line(tmp_path, name, text, error):
    path = tmp_path / name
    path.write_text(text)
    result = _cli(f"--workdir={tmp_path}/run", config=str(path))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and error.format(path=path) in last, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match=f"cannot load config|{name}: get_config"):
        load_config(str(path))  # label_efficiency's --pretrain configs


def test_cli_rejects_a_misspelled_field(tmp_path):
    result = _cli(f"--workdir={tmp_path}", "--config.spatial.ratoi=0.5")
    assert result.returncode != 0
    assert 'error: invalid --config override: ratoi Did you mean "ratio"' in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # nothing ran


def test_cli_rejects_an_invalid_value_before_compiling(tmp_path):
    result = _cli(f"--workdir={tmp_path}", "--config.frequency.increase_factor=0.01")
    assert result.returncode != 0
    assert "error: config.frequency: floor(base_bw * increase_factor)" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Compiling" not in result.stderr and not os.listdir(tmp_path)
