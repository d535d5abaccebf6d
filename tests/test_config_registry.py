"""Config presets, overrides and validation; the plugin registries."""

import pytest

from bench.cli import build_parser, config_from_args
from bench.config import PRESETS, RunConfig, parse_value, preset_config
from bench.errors import BenchError
from bench.model import build_model, num_params
from bench.registry import BACKBONES, DATASETS, METHODS, Registry


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_names_registered_plugins(name):
    """preset_config() builds without validating: each preset must pass the generic checks, every method's
    own checks ("all" expanded by the runner) and name a registered dataset, backbone and far-OOD sets."""
    from bench.config import validate
    from bench.runner import resolve_methods

    cfg = preset_config(name)
    options = dict(cfg.method_options)  # method-only settings (dropout_passes, ...) are method options
    assert cfg.preset == name and all(
        (getattr(cfg, k) if hasattr(cfg, k) else options[k]) == v
        for k, v in PRESETS[name][1].items()
        if k != "method_options"
    )
    validate(cfg)
    assert resolve_methods(cfg)  # METHODS.get(m).validate(cfg) for each
    DATASETS.get(cfg.dataset), BACKBONES.get(cfg.backbone)
    for far in cfg.far_ood or ():
        DATASETS.get(far)


def test_paper_preset_is_the_seed_protocol():
    cfg = preset_config("paper")
    assert (cfg.batch_size, cfg.epochs, cfg.embed_dim, cfg.posterior_samples) == (16, 15, 2, 100)
    assert cfg.heldout_classes == (7, 8, 9) and cfg.backbone == "mlp"
    net = build_model(cfg, (1, 28, 28), seed=0)
    linears = [m for m in net.modules() if m.__class__.__name__ == "Linear"]
    assert len(linears) == 5
    assert num_params(net) <= 15_000  # full LA over all weights stays feasible on a CPU


def test_cli_flags_override_preset():
    args = build_parser().parse_args(
        [
            "run",
            "--preset",
            "paper",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--methods",
            "plain,full_la",
            "--seed",
            "4",
            "--device",
            "cpu",
            "--set",
            "hidden=8,8",
            "--set",
            "prior_precision=2.5",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.epochs == 3 and cfg.batch_size == 8 and cfg.seed == 4 and cfg.device == "cpu"
    assert cfg.methods == ("plain", "full_la") and cfg.hidden == (8, 8)
    assert cfg.prior_precision == "2.5" and cfg.posterior_samples == PRESETS["paper"][1]["posterior_samples"]


def test_every_field_can_be_set_from_the_command_line():
    from dataclasses import fields

    for f in fields(RunConfig):
        default = getattr(RunConfig(), f.name)
        text = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        if isinstance(default, tuple) and not default:
            continue
        assert parse_value(f.name, text) == default, f.name


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "-1"], "epochs must be >= 1"),
        (["--epochs", "abc"], "bad value 'abc' for epochs"),
        (["--batch-size", "1"], "batch-size must be >= 2"),
        (["--set", "ks=0,5"], "every K must be >= 1"),
        (["--set", "nonsense=1"], "unknown config field"),
        (["--set", "far_ood=mnist_ood,synthetic_noise", "--set", "hidden=0"], "hidden widths must be >= 1"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--device", "tpu"], "device must be"),
    ],
)
def test_bad_flags_raise_one_line(flags, fragment):
    with pytest.raises(BenchError) as e:
        config_from_args(build_parser().parse_args(["run", *flags]))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_optional_tuple_fields_parse():
    assert parse_value("far_ood", "mnist_ood,synthetic_noise") == ("mnist_ood", "synthetic_noise")
    assert parse_value("far_ood", "none") is None  # the dataset's default far-OOD sets
    assert parse_value("far_ood", "") == ()  # no far-OOD set
    assert parse_value("hessian_items", "") is None
    assert parse_value("hessian_items", "4096") == 4096


def test_registries_list_builtin_plugins():
    assert "plain" in METHODS.names()
    assert {"fashion_mnist", "mnist_ood", "synthetic", "synthetic_noise"} <= set(DATASETS.names())
    assert "mlp" in BACKBONES.names()
    assert DATASETS.meta("fashion_mnist")["far_ood"] == ("mnist_ood",)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(BenchError, match="known methods: .*plain"):
        METHODS.get("nope")
    with pytest.raises(BenchError, match="known datasets: .*fashion_mnist"):
        DATASETS.get("nope")
    with pytest.raises(BenchError, match="known backbones: .*mlp"):
        BACKBONES.get("nope")


def test_registry_rejects_a_second_plugin_under_one_name():
    reg: Registry = Registry("thing", "methods")
    reg.register("a")(int)
    reg.register("a")(int)  # the same object again (a module imported twice) is fine
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        reg.register("a")(float)


def test_method_options_are_set_from_the_command_line():
    """A method declares its options; `--set` reaches them without RunConfig knowing the method."""
    from methods.hib import HedgedInstanceEmbedding

    args = build_parser().parse_args(
        ["run", "--preset", "smoke", "--set", "hib_samples=4", "--set", "epochs=2"]
    )
    cfg = config_from_args(args)
    assert dict(cfg.method_options)["hib_samples"] == 4 and cfg.epochs == 2
    assert (
        dict(cfg.method_options)["ensemble_size"] == 2
    )  # the smoke preset sets deep_ensemble's option by name
    assert HedgedInstanceEmbedding.option(cfg, "hib_samples") == 4
    assert (
        HedgedInstanceEmbedding.option(cfg, "hib_kl_weight")
        == HedgedInstanceEmbedding.options["hib_kl_weight"].default
    )
    assert cfg.digest() != preset_config("smoke").replace(epochs=2).digest()
    with pytest.raises(BenchError, match="bad value 'x' for hib_samples"):
        config_from_args(build_parser().parse_args(["run", "--set", "hib_samples=x"]))
    with pytest.raises(BenchError, match="method options: .*hib_samples"):
        config_from_args(build_parser().parse_args(["run", "--set", "nope=1"]))


def test_method_option_names_are_unique_and_documented():
    seen: dict[str, str] = {}
    fields_ = set(RunConfig.__dataclass_fields__)
    for m in METHODS.names():
        for name, opt in METHODS.get(m).options.items():
            assert name not in seen and name not in fields_, f"{m}.{name} clashes"
            assert isinstance(opt.default, opt.type) and opt.help
            opt.check(name, opt.default)  # the documented default is allowed
            seen[name] = m


def test_declared_option_rules_are_checked_by_every_method():
    from bench.method import Option

    opt = Option(float, 0.5, "a number", minimum=0.0)
    with pytest.raises(BenchError, match="x must be a finite number >= 0, got -1"):
        opt.check("x", -1.0)
    with pytest.raises(BenchError, match="x must be a finite number"):
        opt.check("x", float("nan"))
    with pytest.raises(BenchError, match="k must be one of a, b, got 'c'"):
        Option(str, "a", "a kind", choices=("a", "b")).check("k", "c")
