"""The one-pass backward kernels (SwiGLU, GLA's gated output, the GLA layer's one VJP) and the
adaLN norm kernels (alone, returning their input, and after a gated residual add) run per
batch shard on 8 fake devices inside a sharded jit, and match one device
(tests/sharded_elementwise_check.py, one subprocess for all)."""
from conftest import run_on_8_devices


def test_kernels_run_per_batch_shard_on_8_devices():
  result = run_on_8_devices("sharded_elementwise_check.py")
  assert result["num_devices"] == 8
  # 2 of the 16 examples per device: 4 x 4 tokens (SwiGLU), 16 tokens (gated output)
  assert result["swiglu_linear"]["kernel_rows"] == [2 * 4 * 4]
  assert result["gated_norm_linear"]["kernel_rows"] == [2 * 16]
  # the GLA layer: every kernel (GLA forward, backward, chunk states; the output stage's
  # backward) on one device's 2 examples (gated output: their 2 x 16 rows)
  rows = result["gla_layer"]["kernel_rows"]
  assert len(rows) >= 4 and set(rows) <= {2, 2 * 16}, rows
  # the adaLN norm's forward and backward kernels on one device's 2 examples
  assert result["layer_norm_modulate"]["kernel_rows"] == [2, 2]
  assert result["layer_norm_modulate_with_input"]["kernel_rows"] == [2, 2]
  assert result["residual_layer_norm_modulate"]["kernel_rows"] == [2, 2]
  for name in ("swiglu_linear", "gated_norm_linear", "gla_layer", "layer_norm_modulate",
               "layer_norm_modulate_with_input", "residual_layer_norm_modulate"):
    assert result[name]["loss_rel_err"] < 1e-5, name
    assert max(result[name]["grad_rel_errs"]) < 1e-5, name
