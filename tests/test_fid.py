"""FID: the Inception network against pytorch-fid's features (golden file), the Frechet distance
against its closed form, and the CLI end to end on small files in the real formats."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from fid_fixtures import IMAGE_SETS, random_images, random_inception_state_dict
from torch_zip_writer import write_state_dict

from dig_jax.evaluate import fid, inception
from dig_jax.evaluate.npz_array import NpzArray

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "inception_golden.npz")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """Random weights in pytorch-fid's .pth format (torch's zip pickle), as users supply them."""
  path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
  write_state_dict(path, random_inception_state_dict(0))
  return str(path)


@pytest.fixture(scope="module")
def model(weights_file):
  return inception.load_pytorch_fid(weights_file)


def test_features_match_pytorch_fid(model):
  """Golden features: pytorch-fid's InceptionV3 on the same weights and images
  (scripts/check_inception_against_torch.py --write_golden, torch 2.14)."""
  with np.load(GOLDEN) as f:
    golden = {k: f[k].astype(np.float64) for k in f.files}
  assert set(golden) == set(IMAGE_SETS)
  for name, args in IMAGE_SETS.items():
    ours = fid.activations(model, random_images(*args), batch_size=2)  # also pads a batch
    ref = golden[name]
    assert ours.shape == ref.shape == (args[1], inception.FEATURES)
    err = np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref ** 2))
    spread = np.sqrt(np.mean((ref - ref.mean(0)) ** 2) / np.mean(ref ** 2))
    assert err < 1e-5 < spread / 100, (name, err, spread)


def test_weights_errors_name_the_tensor():
  tensors = random_inception_state_dict(0)
  bad = dict(tensors)
  del bad["Mixed_6b.branch7x7_2.bn.running_var"]
  with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.bn.running_var"):
    inception.load_state_dict(inception.InceptionV3(), bad)
  bad = dict(tensors)
  bad["Mixed_7c.branch1x1.conv.weight"] = bad["Mixed_7c.branch1x1.conv.weight"][:, :-1]
  with pytest.raises(ValueError, match=r"Mixed_7c.branch1x1.conv.weight has shape \(320, 2047"):
    inception.load_state_dict(inception.InceptionV3(), bad)
  bad = dict(tensors, **{"AuxLogits.conv0.conv.weight": np.ones((128, 768, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors.*AuxLogits"):
    inception.load_state_dict(inception.InceptionV3(), bad)


def test_batch_norm_folding_against_direct_formula():
  rng = np.random.default_rng(3)
  weight = rng.standard_normal((5, 4, 3, 3))
  gamma, beta, mean = rng.uniform(0.5, 2, 5), rng.normal(size=5), rng.normal(size=5)
  var = rng.uniform(0.5, 2, 5)
  kernel, bias = inception.fold_batch_norm(weight, gamma, beta, mean, var)
  patch = rng.standard_normal((3, 3, 4))  # one output pixel of a VALID conv, by hand
  conv = np.einsum("oikl,kli->o", weight, patch)
  expected = gamma * (conv - mean) / np.sqrt(var + 1e-3) + beta
  np.testing.assert_allclose(np.einsum("klio,kli->o", kernel, patch) + bias, expected,
                             rtol=1e-5)


def _rotation(d, rng):
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return q


def test_frechet_distance_closed_form():
  """Covariances sharing eigenvectors: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2 over eigenvalues."""
  rng = np.random.default_rng(0)
  d = 16
  r = _rotation(d, rng)
  a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = r @ np.diag(a) @ r.T, r @ np.diag(b) @ r.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
  # fewer samples than dimensions: singular covariances still give a finite distance
  x, y = rng.normal(size=(5, d)), rng.normal(size=(5, d)) + 1
  value = fid.frechet_distance(*fid.statistics(x), *fid.statistics(y))
  assert np.isfinite(value) and value > d * 0.5
  with pytest.raises(ValueError, match="differ in shape"):
    fid.frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_frechet_distance_against_scipy_sqrtm():
  """General covariances: pytorch-fid's formula, trace of scipy's sqrtm(S1 S2)."""
  import scipy.linalg
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(50, 12)), rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
  (mu1, s1), (mu2, s2) = fid.statistics(x), fid.statistics(y)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_statistics_against_numpy_sums():
  x = np.random.default_rng(1).normal(size=(40, 6))
  mu, sigma = fid.statistics(x)
  centred = x - x.sum(0) / len(x)
  np.testing.assert_allclose(mu, x.sum(0) / len(x))
  np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1))


def test_image_checks():
  with pytest.raises(ValueError, match=r"expected uint8 images.*float32 \[4, 8, 8, 3\]"):
    fid.check_images(np.dtype(np.float32), (4, 8, 8, 3), "--npz")
  with pytest.raises(ValueError, match=r"uint8 \[4, 8, 8, 2\]"):
    fid.check_images(np.dtype(np.uint8), (4, 8, 8, 2), "--npz")
  with pytest.raises(ValueError, match="at least 2 images"):
    fid.check_images(np.dtype(np.uint8), (1, 8, 8, 3), "--npz")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_array_reads_batches_in_order(tmp_path, rng, save):
  images = rng.integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 11)
  save(tmp_path / "s.npz", arr_0=images, arr_1=labels)
  array = NpzArray(str(tmp_path / "s.npz"), "arr_0")
  assert len(array) == 11 and array.shape == images.shape and array.dtype == np.uint8
  got = list(array.batches(4))
  assert [len(b) for b in got] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(got), images)
  with pytest.raises(KeyError, match=r"no array 'arr_2'.*\['arr_0', 'arr_1'\]"):
    NpzArray(str(tmp_path / "s.npz"), "arr_2")


def test_grey_images_count_as_rgb(model, tmp_path):
  grey = random_images(8, 3, 32)[..., :1]
  np.savez(tmp_path / "grey.npz", arr_0=grey)
  from_file = fid.activations(model, fid.npz_images(str(tmp_path / "grey.npz"), "--npz"), 2)
  np.testing.assert_allclose(from_file, fid.activations(model, np.repeat(grey, 3, -1)),
                             rtol=1e-6, atol=1e-9)


def _low_rank_fid(x, y):
  """FID of two small feature sets without a d x d root: S1 = A.T A and S2 = B.T B (centred,
  scaled features), and tr((S1 S2)^(1/2)) is the sum of the singular values of A B.T."""
  a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
  b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
  nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  diff = x.mean(0) - y.mean(0)
  return diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * nuclear


def test_cli_end_to_end(tmp_path, weights_file, model):
  samples, ref = random_images(5, 6, 48), random_images(6, 7, 48)
  np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(6))
  np.savez(tmp_path / "ref.npz", arr_0=ref)
  expected = _low_rank_fid(fid.activations(model, samples), fid.activations(model, ref))
  args = ["-m", "dig_jax.evaluate.fid", "--inception", weights_file,
          "--npz", str(tmp_path / "samples.npz"), "--batch_size", "4"]
  res = run_cli(*args, "--ref", str(tmp_path / "ref.npz"), "--json", str(tmp_path / "a.json"),
                "--save_ref_stats", str(tmp_path / "ref_stats.npz"))
  assert res.returncode == 0, res.stdout + res.stderr
  first = json.loads((tmp_path / "a.json").read_text())
  assert first["fid"] == pytest.approx(expected, rel=1e-6) and first["num_samples"] == 6
  assert "FID" in res.stdout and first["reference_from"] == "7 images"
  # the saved statistics serve as a later --ref (read back, not recomputed)
  mu, sigma, how = fid.reference_statistics(str(tmp_path / "ref_stats.npz"), model, 4)
  ref_mu, ref_sigma = fid.statistics(fid.activations(model, ref))
  assert how == "stored mu / sigma"
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-6, atol=1e-9)
  res = run_cli(*args, "--ref", str(tmp_path / "missing.npz"))
  assert res.returncode != 0 and "--ref=" in res.stderr and "no such file" in res.stderr


def test_reference_statistics_choice(tmp_path, model):
  rng = np.random.default_rng(2)
  mu, sigma = rng.normal(size=2048), np.eye(2048) * 2.0
  images = random_images(7, 3, 32)
  np.savez(tmp_path / "adm_like.npz", arr_0=images, mu=mu, sigma=sigma)
  got_mu, got_sigma, how = fid.reference_statistics(str(tmp_path / "adm_like.npz"), model, 4)
  assert how == "3 images" and not np.allclose(got_mu, mu)
  got_mu, got_sigma, how = fid.reference_statistics(str(tmp_path / "adm_like.npz"), model, 4,
                                                    use_stored=True)
  assert how == "stored mu / sigma" and (got_mu == mu).all() and (got_sigma == sigma).all()
  np.savez(tmp_path / "wrong.npz", mu=mu[:10], sigma=sigma[:10, :10])
  with pytest.raises(ValueError, match=r"mu \(10,\)"):
    fid.reference_statistics(str(tmp_path / "wrong.npz"), model, 4)
  np.savez(tmp_path / "empty.npz", labels=np.arange(3))
  with pytest.raises(ValueError, match="neither images"):
    fid.reference_statistics(str(tmp_path / "empty.npz"), model, 4)
