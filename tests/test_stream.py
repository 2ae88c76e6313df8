"""pipe.stream(): chunk-by-chunk generation, prompt schedules (the official interactive mode) and live prompt changes.

Models: the tiny random Helios-Distilled folder of the end-to-end fixtures (pyramid, DMD, 64x128, with VAE and
UMT5) and the bundled demo model (plain Base, 128x128) with 2 steps and no guidance. Equality checks are exact:
the stream runs the batch call's own chunk loop, so the same seed and inputs must give the same uint8 frames
(``helios_jax.io.media.to_uint8`` of the batch output), and a live change at once must equal the schedule that
switches at that chunk.
"""

from __future__ import annotations

import os
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import HeliosPipeline, HeliosPyramidPipeline, InputError
from helios_jax.io.media import to_uint8
from helios_jax.pipelines import PromptSchedule, StreamClosedError
from helios_jax.pipelines.prompts import PromptController, live_weight, schedule_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTILLED = os.path.join(ROOT, "tests", "reference", "fixtures", "e2e", "distilled")
DEMO = os.path.join(ROOT, "helios_jax", "assets", "demo", "model")
A, B = "a cat sat on the mat", "a dog runs in the snow at night"


@pytest.fixture(scope="module")
def distilled():
  return HeliosPyramidPipeline.from_pretrained(DISTILLED, dtype=jnp.float32, text_encoder_dtype=jnp.float32)


@pytest.fixture(scope="module")
def demo():
  return HeliosPipeline.from_pretrained(DEMO, dtype=jnp.float32, text_encoder_dtype=jnp.float32)


def dkw(**kw):
  base = dict(height=64, width=128, guidance_scale=1.0, pyramid_num_inference_steps_list=(2, 2, 2),
              is_amplify_first_chunk=True, seed=3)
  base.update(kw)
  return base


def streamed(stream) -> np.ndarray:
  return np.concatenate([c.frames for c in stream])


_batch_cache: dict = {}


def batch_uint8(pipe, **kw) -> np.ndarray:
  key = (id(pipe), repr(sorted(kw.items())))
  if key not in _batch_cache:
    _batch_cache[key] = to_uint8(pipe(progress=False, **kw).frames[0])
  return _batch_cache[key]


# ----------------------------------------------------------------------------------------------------------------------
# stream = batch


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_stream_equals_batch_pyramid(distilled, prefetch):
  want = batch_uint8(distilled, prompt=A, num_frames=99, **dkw())
  s = distilled.stream(A, num_frames=99, prefetch=prefetch, **dkw())
  assert (s.num_chunks, s.num_frames, s.frames_per_chunk, s.fps, s.height, s.width) == (3, 97, 33, 24, 64, 128)
  chunks = list(s)
  assert [c.index for c in chunks] == [0, 1, 2]
  assert [c.first_frame for c in chunks] == [0, 33, 66]
  assert [c.frames.shape[0] for c in chunks] == [33, 33, 31]  # 99 -> 97 frames (4k + 1), as the batch trims
  assert all(c.frames.dtype == np.uint8 for c in chunks)
  assert [c.timings["steps"] for c in chunks] == [12, 6, 6]  # amplified first chunk
  ready = [c.timings["ready_s"] for c in chunks]
  assert ready == sorted(ready) and ready[0] > 0
  np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), want)


def test_stream_equals_batch_plain_i2v(demo):
  image = os.path.join(ROOT, "helios_jax", "assets", "demo", "start.png")
  kw = dict(height=128, width=128, num_inference_steps=2, guidance_scale=1.0, seed=5, image=image)
  want = batch_uint8(demo, prompt=A, num_frames=66, **kw)
  got = streamed(demo.stream(A, num_frames=66, **kw))
  assert got.shape == want.shape == (65, 128, 128, 3)
  np.testing.assert_array_equal(got, want)


def test_endless_stream_stops_and_keeps_no_latents(distilled):
  s = distilled.stream(A, **dkw())
  assert s.num_chunks is None and s.num_frames is None and "endless" in repr(s)
  seen = []
  for chunk in s:
    seen.append(chunk.index)
    if chunk.index == 3:
      s.stop()
  # chunk 4 may already have been started (prefetch 1) when stop() came: it is then still delivered
  assert seen in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
  assert s._run.produced == []  # nothing accumulates: memory stays flat however long the stream runs
  with pytest.raises(StreamClosedError, match="ended"):
    s.set_prompt(B)
  want = batch_uint8(distilled, prompt=A, num_frames=99, **dkw())
  again = distilled.stream(A, **dkw())
  first = [next(again).frames for _ in range(3)]
  again.close()
  assert again.closed and list(again) == []
  np.testing.assert_array_equal(np.concatenate(first)[:97], want)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt schedules (official interactive mode) and live changes


def test_schedule_weights_follow_the_reference():
  # torch.linspace(0, 1, steps)[p] for the first `steps` chunks of a new prompt, then 1
  assert [schedule_weight(p, 3) for p in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]
  assert [schedule_weight(p, 1) for p in range(3)] == [0.0, 1.0, 1.0]
  assert [schedule_weight(p, 0) for p in range(2)] == [1.0, 1.0]
  assert [live_weight(p, 3) for p in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
  assert live_weight(0, 0) == live_weight(0, 1) == 1.0
  sched = PromptSchedule(prompts=("x", "y", "z"), chunks=(2, 3, 3), interpolation_steps=3)
  assert sched.total_chunks == 8
  got = [sched.position(k) for k in range(10)]
  assert got == [(0, 0, 1.0), (0, 0, 1.0), (0, 1, 0.0), (0, 1, 0.5), (0, 1, 1.0), (1, 2, 0.0), (1, 2, 0.5),
                 (1, 2, 1.0), (2, 2, 1.0), (2, 2, 1.0)]  # past the end the last prompt holds


def test_controller_blends_linearly():
  e = {name: jnp.full((1, 4, 2), v, jnp.float32) for name, v in (("a", 0.0), ("b", 3.0), ("c", -6.0))}
  ctl = PromptController(e["a"], lambda text: e[text], interpolation_steps=3, text="a")
  assert ctl.for_chunk(0)[1] == {"weight": 1.0, "request_ids": [], "text": "a"}
  rid = ctl.request("b")
  values = []
  for k in range(1, 5):
    emb, info = ctl.for_chunk(k)
    values.append(float(emb[0, 0, 0]))
    assert info["request_ids"] == ([rid] if k == 1 else []) and info["text"] == "b"
  assert values == pytest.approx([1.0, 2.0, 3.0, 3.0])
  # a change in the middle of a blend starts from the embeddings in use
  ctl.request("c", blend_chunks=2)
  ctl.for_chunk(5)
  r2 = ctl.request("a", blend_chunks=2)
  emb, info = ctl.for_chunk(6)
  assert info["request_ids"] == [r2] and float(emb[0, 0, 0]) == pytest.approx(-1.5 / 2)  # from -1.5 halfway to 0
  emb, _ = ctl.for_chunk(7)
  assert float(emb[0, 0, 0]) == 0.0
  ctl.request(prompt_embeds=np.full((4, 2), 9.0, np.float32), blend_chunks=0)
  assert float(ctl.for_chunk(8)[0][0, 0, 0]) == 9.0


@pytest.mark.parametrize("args, pattern", [
    (dict(), "either a prompt string or prompt_embeds"),
    (dict(prompt="x", prompt_embeds=np.zeros((1, 4, 2))), "either a prompt string or prompt_embeds"),
    (dict(prompt=7), "must be a string"),
    (dict(prompt="x", blend_chunks=-1), "blend_chunks must be a non-negative integer"),
    (dict(prompt="x", blend_chunks=1.5), "blend_chunks must be a non-negative integer"),
    (dict(prompt_embeds=np.zeros((1, 5, 2))), r"shape \(1, 4, 2\)"),
    (dict(prompt_embeds=np.zeros((1, 4, 2), np.int32)), "floating point"),
])
def test_controller_refuses_bad_requests(args, pattern):
  ctl = PromptController(jnp.zeros((1, 4, 2)), lambda t: jnp.zeros((1, 4, 2)))
  with pytest.raises(InputError, match=pattern):
    ctl.request(**args)


def test_controller_without_text_encoder():
  ctl = PromptController(jnp.zeros((1, 4, 2)), None)
  with pytest.raises(InputError, match="no text encoder"):
    ctl.request("x")


def test_schedule_in_batch_and_stream(distilled):
  sched = PromptSchedule(prompts=(A, B), chunks=(1, 2), interpolation_steps=2)
  batch = batch_uint8(distilled, prompt_schedule=sched, num_frames=None, **dkw())
  s = distilled.stream(prompt_schedule=sched, **dkw())
  assert s.num_chunks == 3
  chunks = list(s)
  assert [c.prompt["weight"] for c in chunks] == [1.0, 0.0, 1.0]
  assert [c.prompt["text"] for c in chunks] == [A, B, B]
  np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), batch)
  # weight 0 at the switch (the reference's first blend step): chunks 0-1 are prompt A's, chunk 2 is not
  only_a = batch_uint8(distilled, prompt=A, num_frames=99, **dkw())
  np.testing.assert_array_equal(batch[:66], only_a[:66])
  # (the tiny random model's frames barely depend on the prompt: a few percent of the values move by 1-2)
  assert (batch[66:] != only_a[66:]).mean() > 0.01


def test_live_change_equals_schedule(distilled):
  """With prefetch 0, set_prompt(B, at once) after chunk 0 arrives applies from chunk 1: the same frames as the
  schedule A, B, B with no blend."""
  want = batch_uint8(distilled, prompt_schedule=PromptSchedule((A, B), (1, 2), interpolation_steps=0),
                     num_frames=None, **dkw())
  s = distilled.stream(A, num_frames=99, prefetch=0, **dkw())
  chunks = [next(s)]
  rid = s.set_prompt(B, blend_chunks=0)
  chunks += list(s)
  assert [c.prompt["request_ids"] for c in chunks] == [[], [rid], []]
  assert [c.prompt["text"] for c in chunks] == [A, B, B]
  np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), want)


def test_live_change_with_prefetch_applies_within_prefetch_chunks(distilled):
  """prefetch 1: chunk 1 may already be under way when chunk 0 is handed out, so the change applies from chunk 1
  or 2, and the chunk that first uses it says so."""
  s = distilled.stream(A, num_frames=132, prefetch=1, **dkw())
  chunks = [next(s)]
  rid = s.set_prompt(B, blend_chunks=2)
  chunks += list(s)
  applied = [c.index for c in chunks if rid in c.prompt["request_ids"]]
  assert len(applied) == 1 and applied[0] in (1, 2)
  weights = [c.prompt["weight"] for c in chunks[applied[0]:]]
  assert weights[:2] == [0.5, 1.0] and all(c.prompt["text"] == A for c in chunks[:applied[0]])


def test_live_change_from_another_thread(distilled):
  s = distilled.stream(A, num_frames=132, prefetch=0, **dkw())
  got = []
  for chunk in s:
    got.append(chunk)
    if chunk.index == 0:
      t = threading.Thread(target=lambda: s.set_prompt(B, blend_chunks=2))
      t.start()
      t.join()
  # prefetch 0: the change applies to the very next chunk, blended over 2 chunks
  assert [c.prompt["weight"] for c in got] == [1.0, 0.5, 1.0, 1.0]
  assert got[1].prompt["request_ids"] == [0]


def test_schedule_from_official_csv(tmp_path):
  p = tmp_path / "prompts.csv"
  p.write_text('id,prompt_index,prompt,refined_prompt\n'
               '10,1,"second, with a comma",\n'
               '10,0,first,better first\n'
               '2,0,only one,\n', encoding="utf-8")
  got = PromptSchedule.from_csv(p, interpolate_time=5, interpolation_steps=2)
  assert list(got) == ["2", "10"]  # numeric ids in numeric order
  p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())  # a byte-order mark, as Excel saves UTF-8 CSVs
  assert PromptSchedule.from_csv(p, interpolate_time=5, interpolation_steps=2) == got
  assert got["10"].prompts == ("better first", "second, with a comma") and got["10"].chunks == (5, 5)
  assert got["2"].prompts == ("only one",) and got["2"].interpolation_steps == 2


@pytest.mark.parametrize("text, pattern", [
    ("id,prompt\n1,a\n", "lacks the column prompt_index"),
    ("id,prompt_index,prompt\n", "no prompt rows"),
    ("id,prompt_index,prompt\n1,x,a\n", "line 2: prompt_index must be an integer"),
    ("id,prompt_index,prompt\n1,0,\n", "line 2: empty prompt"),
])
def test_bad_csv(tmp_path, text, pattern):
  p = tmp_path / "p.csv"
  p.write_text(text, encoding="utf-8")
  with pytest.raises(InputError, match=pattern):
    PromptSchedule.from_csv(p)


def test_csv_not_utf8_or_missing(tmp_path):
  p = tmp_path / "p.csv"
  p.write_bytes(b"id,prompt_index,prompt\n1,0,caf\xe9\n")
  with pytest.raises(InputError, match="not UTF-8"):
    PromptSchedule.from_csv(p)
  with pytest.raises(InputError, match="not found"):
    PromptSchedule.from_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize("kw, pattern", [
    (dict(prompts=(), chunks=()), "at least one prompt"),
    (dict(prompts=("a", "b"), chunks=(1,)), "one length per prompt"),
    (dict(prompts=("a",), chunks=(0,)), "positive whole number"),
    (dict(prompts=("a", "b"), chunks=(3, 2), interpolation_steps=3), "prompt 1 holds for 2 chunks"),
    (dict(prompts=("a", np.zeros((1, 4, 2))), chunks=(1, 1)), "either strings or embeddings"),
])
def test_bad_schedules(kw, pattern):
  with pytest.raises(InputError, match=pattern):
    PromptSchedule(**kw)


@pytest.mark.parametrize("kw, pattern", [
    (dict(prompt=[A, B]), "one video: pass one prompt"),
    (dict(prompt=A, output_type="latent"), "use the batch call"),
    (dict(prompt=A, prefetch=-1), "prefetch must be"),
    (dict(prompt=A, prompt_schedule=PromptSchedule((A,), (1,))), "not both"),
    (dict(prompt=A, prompt_schedule="a, b"), "must be a PromptSchedule"),
    (dict(prompt=A, interpolation_steps=-2), "interpolation_steps must be"),
    (dict(prompt=A, num_frames=0), "num_frames must be a positive integer"),
])
def test_bad_stream_arguments(distilled, kw, pattern):
  with pytest.raises(InputError, match=pattern):
    distilled.stream(**dkw(), **kw)


def test_batch_call_needs_num_frames(distilled):
  with pytest.raises(InputError, match="num_frames is needed"):
    distilled(prompt=A, num_frames=None, progress=False, **dkw())


def test_close_wait_ends_the_dispatch_thread(distilled):
  s = distilled.stream(A, prefetch=2, **dkw())
  next(s)
  s.close(wait=True, timeout=120)
  assert s.closed and not s._worker.is_alive() and s.join(0) is True
  assert list(s) == []


def test_step_progress_hears_every_step_and_changes_nothing(distilled):
  heard = []
  want = batch_uint8(distilled, prompt=A, num_frames=66, **dkw())
  got = distilled(prompt=A, num_frames=66, progress=False, step_progress=lambda k, n: heard.append((k, n)),
                  **dkw()).frames[0]
  np.testing.assert_array_equal(to_uint8(got), want)
  # chunk 0 amplified (3 stages x 4 steps), chunk 1 plain (3 x 2); the callbacks may arrive in any order
  assert sorted(heard) == sorted([(k, 4) for k in range(4)] * 3 + [(k, 2) for k in range(2)] * 3)
