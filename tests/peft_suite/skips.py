"""Where petuning's methods do not run one of peft's generic tests, and why. Every other peft test must pass, or skip
exactly where peft skips it for LoRA too (the harness checks that).

``ALLOWED_SKIPS``: peft itself skips the test for the method, although it runs it for LoRA (keyed by the test's name
or the start of peft's skip message); the reason says why the test cannot apply. ``NOT_APPLICABLE``: the test is
not run (keyed by peft test name, ``name[argument=value]`` for one parametrization, ``name@model`` or
``name@model:targets`` for one case), with the reason and, where there is one, the petuning test that checks the
behaviour instead.
"""

from __future__ import annotations

from petuning import FloraConfig, MaskTuningConfig, PatConfig, SorsaConfig, SparseLowRankConfig

_MIXED_BATCHES = (
    "peft implements mixed-adapter batches (`adapter_names=` in forward) for LoRA and RoAD only; petuning's layers do "
    "not offer them"
)
_WEIGHTED = "add_weighted_adapter is an API of peft's LoRA and IA3 tuners only"
_NO_BIAS = "the method trains no biases, so its config has no `bias` option"

ALLOWED_SKIPS: dict[type, dict[str, str]] = {
    cls: {
        "Mixed adapter batches not supported": _MIXED_BATCHES,
        "test_weighted_combination_of_adapters": _WEIGHTED,
    }
    for cls in (SorsaConfig, FloraConfig, SparseLowRankConfig, MaskTuningConfig, PatConfig)
}
for cls in (MaskTuningConfig, PatConfig):
    ALLOWED_SKIPS[cls][f"{cls} does not support the 'bias' argument"] = _NO_BIAS
ALLOWED_SKIPS[PatConfig]["This PEFT method does not support layers_to_transform"] = (
    "PAT prunes the one hidden width that every layer shares, so it cannot adapt only some layers"
)

_SGD_DIVERGES = (
    "the update is a product of several trained factors ({}), so plain SGD at peft's lr 0.5 (lr 0.01 on Conv2dGroups2, "
    "whose inputs reach 57,600) diverges to NaN on this model within three steps, as the issue's SORSA case"
)
_PACKED = (
    "the default masked-tuning file stores only the positions the masks zero, which define the model, not the float "
    "scores, so raw scores do not round-trip; the same peft test passes with save_scores=True (run here too), and "
    "tests/test_mask_tuning_saving.py checks that the compact file reproduces the model exactly"
)
PACKED_ONLY = (
    "test_save_pretrained",
    "test_save_pretrained_pickle",
    "test_save_pretrained_selected_adapters",
    "test_save_pretrained_selected_adapters_pickle",
    "test_parameters_after_loading_model",
)
"""The masked-tuning entries that hold only for the default compact file (not with save_scores=True)."""
_FP32_SCORES = (
    "masked-tuning scores stay float32 with autocast_adapter_dtype=False (documented in MaskTuningLayer); "
    "tests/test_attach_paths.py checks that every other tensor takes the base dtype"
)

NOT_APPLICABLE: dict[type, dict[str, str]] = {
    SorsaConfig: {
        "test_parameters_after_loading_model@MLP:['lin0', 'lin1']": _SGD_DIVERGES.format(
            "SORSA trains the principal singular values and vectors"
        ),
    },
    FloraConfig: {
        **{
            f"test_parameters_after_loading_model@{case}": _SGD_DIVERGES.format(
                "the Tucker core and one factor per mode"
            )
            for case in (
                "MLP:['lin0', 'lin1']",
                "Conv2d:['conv2d', 'lin0']",
                "Conv3d:['conv3d', 'lin0']",
                "Conv2dGroups2",
            )
        },
        **{
            f"{name}@Conv2dGroups2": _SGD_DIVERGES.format("the Tucker core and one factor per mode")
            for name in ("test_disable_adapters", "test_disable_adapters_with_merging", "test_safe_merge")
        },
        "test_only_params_are_updated@EmbConv1D:['emb']": (
            "FLoRA's core starts at zero (the paper's init), so the factors' gradients are zero at the first step and "
            "second order after it; on this embedding they stay below peft's 1e-4 tolerance for its three steps "
            "(the MLP and convolution cases pass)"
        ),
    },
    SparseLowRankConfig: {
        f"test_only_params_are_updated@MLP:{targets}": (
            "the default density (1%) selects no entry of the 2x20 layer lin1, so one random entry is kept, and it "
            "falls on input unit 8, which the ReLU zeroes for every row of peft's batch: its one sparse value gets an "
            "exact-zero gradient (the low-rank part trains)"
        )
        for targets in ("['lin1']", "['lin0', 'lin1']")
    },
    MaskTuningConfig: {
        "test_adapter_dtype_autocast[autocast_adapter_dtype=False]": _FP32_SCORES,
        "test_add_adapter_no_autocast_adapter_dtype": _FP32_SCORES,
        "test_disable_adapters@EmbConv1D": (
            "a binary mask changes the output only once a score crosses the threshold, which peft's three SGD steps "
            "on this model's 1-output Conv1D do not reach (the MLP cases pass)"
        ),
        **dict.fromkeys(PACKED_ONLY, _PACKED),
    },
    PatConfig: {
        "test_prepare_for_training_parametrized": (
            "PAT places a trainable HSM right after the token embedding (the paper's design), so the embedding "
            "output requires grad by construction"
        ),
    },
}
