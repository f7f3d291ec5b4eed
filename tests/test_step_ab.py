"""scripts/step_ab.py: the old arm really runs the old copy of the module, the new arm the tree's,
and the module is whole again afterwards."""
import os
import sys

import pytest

from kernels_pallas import tiling
from kernels_pallas.conv import reference as conv_reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import step_ab  # noqa: E402

# An "old" depthwise conv: the tree's, counting the traces that reach it.
OLD_CONV = """
from kernels_pallas.conv.reference import depthwise_conv3x3 as _tree_conv
TRACED = []

def depthwise_conv3x3(x, kernel, bias):
  TRACED.append(x.shape)
  return _tree_conv(x, kernel, bias)
"""


def test_cases_and_old_module_are_parsed_with_clear_errors(tmp_path):
  assert step_ab.parse_cases("DiG-S/2:1792:1, DiT-S/2:256:64") == [
      ("DiG-S/2", 1792, 1), ("DiT-S/2", 256, 64)]
  for bad in ("DiG-S/2:256", "DiG-S/2:px:1", ""):
    with pytest.raises(ValueError, match="--cases"):
      step_ab.parse_cases(bad)
  with pytest.raises(ValueError, match="module=path"):
    step_ab.load_old("kernels_pallas.tiling")
  with pytest.raises(ValueError, match="no file"):
    step_ab.load_old(f"kernels_pallas.tiling={tmp_path / 'missing.py'}")


def test_swapped_takes_the_old_names_and_restores_the_module(tmp_path):
  path = tmp_path / "old_tiling.py"
  path.write_text("def largest_pow2_divisor(n, cap):\n  return -1\n\nEXTRA = 3\n")
  module, old = step_ab.load_old(f"kernels_pallas.tiling={path}")
  assert module is tiling
  before = tiling.largest_pow2_divisor(48, 64)
  assert before == 16
  with step_ab.swapped(module, old):
    assert tiling.largest_pow2_divisor(48, 64) == -1 and tiling.EXTRA == 3
  assert tiling.largest_pow2_divisor(48, 64) == before and not hasattr(tiling, "EXTRA")


def test_later_old_files_import_the_earlier_old_names(tmp_path):
  """Two old files: the second's `from kernels_pallas.tiling import ...` gets the first old
  file's function; after loading, and outside the swap, both modules are the tree's again."""
  first, second = tmp_path / "old_tiling.py", tmp_path / "old_conv_ref.py"
  first.write_text("def largest_pow2_divisor(n, cap):\n  return -7\n")
  second.write_text("from kernels_pallas.tiling import largest_pow2_divisor\n"
                    "SEEN = largest_pow2_divisor(48, 64)\n")
  pairs = step_ab.load_olds([f"kernels_pallas.tiling={first}",
                             f"kernels_pallas.conv.reference={second}"])
  assert [module for module, _ in pairs] == [tiling, conv_reference]
  assert pairs[1][1].SEEN == -7
  assert tiling.largest_pow2_divisor(48, 64) == 16 and not hasattr(conv_reference, "SEEN")
  with step_ab.all_swapped(pairs):
    assert tiling.largest_pow2_divisor(48, 64) == -7 and conv_reference.SEEN == -7
  assert tiling.largest_pow2_divisor(48, 64) == 16 and not hasattr(conv_reference, "SEEN")


def test_each_arm_traces_its_own_code(tmp_path):
  path = tmp_path / "old_conv.py"
  path.write_text(OLD_CONV)
  module, old = step_ab.load_old(f"kernels_pallas.conv.reference={path}")
  assert module is conv_reference
  cfg = step_ab.config("DiG-S/2", 32, 2, steps=1, impl="reference", depth=2)
  arms = step_ab.run_case(cfg, [(module, old)], rounds=1)
  # the old arm's two blocks, traced once; the new arm (compiled first) never reached it
  assert len(old.TRACED) == 2
  assert all(shape[0] == 2 for shape in old.TRACED)
  assert set(arms) == {"new", "old"}
  for median, fastest, temp in arms.values():
    assert 0 < fastest <= median and temp >= 0
  assert module.depthwise_conv3x3 is not old.depthwise_conv3x3


def test_main_prints_both_arms_per_case(monkeypatch, tmp_path, capsys):
  path = tmp_path / "old_tiling.py"
  path.write_text("def largest_pow2_divisor(n, cap):\n  return 1\n")
  seen = []

  def fake_run_case(cfg, pairs, rounds):
    assert [module for module, _ in pairs] == [tiling]
    seen.append((cfg["model"], cfg["px"], cfg["batch"], cfg["steps"], rounds))
    return {"new": (9.0, 8.5, 1.25), "old": (10.0, 9.5, 1.5)}

  monkeypatch.setattr(step_ab, "run_case", fake_run_case)
  step_ab.main(["--old", f"kernels_pallas.tiling={path}", "--cases", "DiG-S/2:512:16",
                "--rounds", "2", "--steps", "7"])
  assert seen == [("DiG-S/2", 512, 16, 7, 2)]
  out = capsys.readouterr().out
  assert "old 10.00 / 9.50 ms, new 9.00 / 8.50 ms" in out and "-10.0 %" in out
  assert "1.50 -> 1.25 GiB" in out
