import re

import jax
import pytest

from _util import CACHE_DIR, MIN_COMPILE_SECONDS
# Re-used compilations across tests (and runs) keep the suite fast on 2 cores. Every
# compilation is kept, however quick: the op-by-op calls of a trainer run (decode, k-means
# on host arrays, ...) are a few hundred compilations of ~0.1 s each, made again by every
# subprocess and xdist worker unless cached (about a third of a tiny run's time, warm).
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A finished run of ``configs/tiny.py`` (FP 4 steps, merge, ClusterQAT 4 steps, export,
  report), once per test process: ``(workdir, report)``. Tests that change the workdir
  copy it first."""
  from configs import tiny
  from repvgg_jax.train.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  return workdir, train_and_evaluate(tiny.tiny_config(), workdir)


# The slow tier, which `-m "not slow"` leaves out: whole modules that train, spawn processes,
# run a notebook or a compiler; every test that needs a finished run (the ``tiny_run``
# fixture); and the tests below, each over 5 s cold on 2 cores (pytest --durations, 2026-12-07)
# while a quicker test of the same behaviour stays in the fast tier.
SLOW_MODULES = ("tests/train/test_pipeline.py", "tests/train/test_launch.py",
                "tests/train/test_local_mode.py", "tests/train/test_train_sharding.py",
                "tests/train/test_workdir.py", "tests/deploy/test_iree.py",
                "tests/deploy/test_openvino.py", "tests/deploy/test_deploy_snippets.py",
                "tests/test_notebook.py", "tests/data/test_prepare.py",
                "tests/test_accelerator.py", "tests/test_readme.py",
                "experiments/tests/test_study.py", "tests/deploy/test_coreml.py",
                "tests/models/test_lowering.py", "tests/test_convert.py",
                "tests/test_torch_repvgg.py")
SLOW_TESTS = (
    "tests/data/test_data.py::test_worker_processes_give_the_same_stream_and_resume",
    "tests/deploy/test_deploy.py::test_integer_forward_compiled_is_the_integer_chain_eager",
    "tests/deploy/test_deploy.py::test_integer_forward_gives_the_fake_quant_predictions",
    "tests/quant/test_quant_layouts.py::test_size_accounting_is_the_bytes_of_the_saved_arrays",
    "tests/quant/test_quant_mixed.py::test_layer_bytes_is_the_packed_files_accounting",
    "tests/models/test_oabn.py::test_oabn_removes_merged_kernel_outliers_and_stays_exact",
    "tests/test_penalties.py::test_a_gradient_step_on_the_penalty_reduces_the_outliers",
    "tests/train/test_distill.py::test_a_distilled_step_at_weight_zero_is_the_plain_step",
    "tests/train/test_train.py::test_no_host_transfer_between_sync_steps",
    "tests/quant/test_quant_mixed.py::test_hessian_sensitivity_is_trace_per_weight",
    "tests/quant/test_quant_export.py::test_qat_forward_equals_packed_forward_bit_for_bit[cluster-channel]",
    "tests/deploy/test_onnx.py::test_codebook_export_runs_load_packed_in_onnx_runtime",
    "tests/deploy/test_onnx.py::test_grouped_and_se_variants_export",
    "tests/deploy/test_onnx.py::test_demo_and_a0_run_every_conv_and_the_head_as_integer_ops",
    "tests/models/test_models.py::test_bn_is_oabn_without_a_bound_bit_for_bit",
    "tests/models/test_oabn.py::test_branch_form_bounds_every_merged_channel_and_merges_exactly",
    "tests/quant/test_quant_cluster.py::test_quantizer_apply_uses_few_levels_and_keeps_biases",
    "tests/quant/test_quant_layouts.py::test_grouped_model_packs_with_one_codebook_a_group",
    "tests/quant/test_quant_layouts.py::test_vector_model_packs_loads_and_exports",
    "tests/quant/test_quant_mixed.py::test_loss_sensitivity_is_the_loss_with_that_layer_alone",
    "tests/test_penalties.py::test_fp_stage_logs_and_trains_with_the_penalty",
    "tests/test_penalties.py::test_init_from_with_other_oabn_settings_names_both",
    "tests/test_reparam.py::test_merge_is_exact_for_every_structure_of_the_zoo",
    "tests/train/test_distill.py::test_a_resumed_distilled_qat_equals_an_uninterrupted_one",
    "tests/train/test_distill.py::test_distillation_runs_in_the_trainer_and_logs_its_loss",
    "tests/train/test_train.py::test_a_profile_longer_than_the_stage_is_closed_with_it",
    "tests/train/test_train.py::test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint",
    "tests/train/test_train.py::test_resume_after_kill_is_bit_exact",
    "experiments/tests/test_stock_tools.py::test_smoke_run_writes_ledger_and_page",
    # (pytest --durations, 2026-12-08)
    "tests/deploy/test_graph.py::test_every_runtime_follows_a_layer_added_to_the_graph",
    "tests/deploy/test_onnx.py::test_int8_grid_export_runs_the_integer_forward_in_onnx_runtime[cluster-opts3]",
    "tests/train/test_train.py::test_profile_writes_a_trace_tensorboard_reads",
    "tests/test_analysis.py::test_bound_factors_are_the_branch_bounds_scale_per_channel",
    "tests/quant/test_quant_cluster.py::test_init_codebook_no_worse_than_sklearn[3-",
    "tests/quant/test_quant_export.py::test_qat_forward_equals_packed_forward_bit_for_bit[uniform-tensor]",
)
# The eager merges at the odd size (the jitted ones at 33 px and the eager ones at 32 stay).
SLOW_NODE_PATTERN = re.compile(r"tests/test_reparam\.py::MergeTinyTest::.*size=33.*__without_jit")


def pytest_collection_modifyitems(config, items):
  for item in items:
    path = item.path.as_posix()
    if (path.endswith(SLOW_MODULES) or item.nodeid.startswith(SLOW_TESTS)
        or SLOW_NODE_PATTERN.fullmatch(item.nodeid)
        or "tiny_run" in getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
