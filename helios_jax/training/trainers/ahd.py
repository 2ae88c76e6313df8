"""Stage 3 DMD loop (training-spec 7.5): builds the networks, jits the phases, runs, checkpoints, exports.

A training step is a host-level sequence of jitted phases (so the generator's graph and the score /
discriminator graphs never share one program, and, with ``offload.idle_trunk_on_host``, only the trunk of the
running phase is on the device):

1. ``prepare``: conditioning draws for the primary and secondary samples; whether each history is all zero
   (the amplified first-chunk schedule, a static choice, is read on the host);
2. generator step every ``dmd.update_ratio`` steps: ``rollout`` (generator trunk) -> ``score`` (teacher trunk:
   DMD gradient + GAN input gradient = the cached cotangent) -> ``gen_grads`` (generator trunk, rollout again
   with gradient) -> ``gen_update``;
3. critic step every step: ``rollout`` (no gradient) -> ``critic_grads`` (teacher trunk) -> ``critic_update``;
4. EMA of the generator trainables (every step before ``ema.start_step``, then on generator steps; spec 7.8).

On a mesh (``config.mesh``, :class:`helios_jax.parallel.layout.TrainLayout`) both trunks, both trainables, their
optimiser states and the EMA are split by the FSDP rule, each batch over ``data x fsdp``, and the phases run under
``jax.set_mesh``: their inputs carry the shardings, and the phases that return a train-state-like tree (gradients,
updates, EMA) or a batch-like array (rollout, cotangent) declare their output shardings, so gradients are
reduce-scattered into the trainables' shards and the state never changes layout. Host offload keeps every array's
sharding (``offload``), so it combines with a mesh.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from helios_jax.errors import InputError
from helios_jax.parallel import mesh as mesh_lib
from helios_jax.parallel.layout import TrainLayout
from helios_jax.training import (ahd, data, ema as ema_lib, gan, loop, losses, lora, offload, stages,
                                 state as state_lib)
from helios_jax.training.export import export_merged
from helios_jax.training.sources import make_source, negative_embeds  # noqa: F401  (negative_embeds re-exported)


@dataclasses.dataclass
class Trunks:
  """The frozen generator and teacher states; with ``offload`` only the requested one stays on the device."""

  gen: object
  teacher: object
  offload: bool = False

  @property
  def shared(self) -> bool:
    return self.gen is self.teacher

  def get(self, name: str):
    if self.offload and not self.shared:
      other = "teacher" if name == "gen" else "gen"
      # leaf by leaf, each source freed after its copy: neither device nor pinned host ever holds both trunks
      out, inc = offload.swap(getattr(self, other), getattr(self, name))
      setattr(self, other, out)
      setattr(self, name, inc)
    return getattr(self, name)


def build_trunks(config, layout: TrainLayout | None = None):
  """(graphdef, Trunks): the generator base and the teacher base (one object when they are the same weights),
  placed on ``layout``'s parameter shardings when given."""
  place = (lambda t: t) if layout is None else layout.place
  model = stages.build_model(config.model)
  graphdef, frozen_gen = nnx.split(model)
  arch = model.config.to_dict()
  del model
  frozen_gen = place(frozen_gen)
  t = config.teacher
  seed = int(config.model.init_seed) if int(t.init_seed) < 0 else int(t.init_seed)
  same = (t.pretrained or config.model.pretrained) == config.model.pretrained and (
      config.model.pretrained or seed == int(config.model.init_seed))
  if same:
    frozen_teacher = frozen_gen
  else:
    tcfg = config.model.copy_and_resolve_references()
    tcfg.pretrained = t.pretrained
    tcfg.init_seed = seed
    teacher = stages.build_model(tcfg)
    if teacher.config.to_dict() != arch:
      raise InputError("the teacher and the generator must have the same architecture (transformer config)")
    frozen_teacher = place(nnx.split(teacher)[1])
    del teacher
  return graphdef, Trunks(frozen_gen, frozen_teacher, bool(config.offload.idle_trunk_on_host))


def make_roles(config, graphdef) -> ahd.Roles:
  return ahd.Roles(graphdef=graphdef, gen_scale=stages.lora_scale(config.train),
                   critic_scale=stages.lora_scale(config.critic), hooks=tuple(int(h) for h in config.gan.hooks),
                   head_groups=int(config.gan.head_groups), patch=(1, 2, 2))


def init_state(config, trunks: Trunks, model_config, tx_gen, tx_critic, layout: TrainLayout | None = None) -> dict:
  """The full train state: step, rng, both trainables with their optimiser states, EMA and its call count.

  With ``layout`` every part is computed directly into its shardings (FSDP rule; scalars replicated).
  """
  seed = int(config.seed)
  build = (lambda fn, *args: fn(*args)) if layout is None else layout.init
  gen = build(lambda f: stages.init_trainable(f, config.train, seed), trunks.gen)
  critic = build(lambda f: stages.init_trainable(f, config.critic, seed + 1), trunks.teacher)
  critic["heads"] = {}
  if config.gan.enabled:
    g = config.gan
    critic["heads"] = build(lambda: gan.init_heads(
        jax.random.key(seed + 2), num_hooks=len(g.hooks), hidden_dim=model_config.inner_dim,
        out_channels=model_config.out_channels, width=int(g.head_width), groups=int(g.head_groups),
        use_hooks=bool(g.use_hooks), use_final=bool(g.use_final)))
  host_opt = bool(config.offload.optimizer_on_host)

  def opt_init(tx, params):
    if host_opt:
      return offload.init_on_host(tx.init, params, shardings=None if layout is None else layout.shardings)
    return build(tx.init, params)

  out = build(lambda: dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed))))
  out.update(gen=dict(trainable=gen, opt_state=opt_init(tx_gen, gen)),
             critic=dict(trainable=critic, opt_state=opt_init(tx_critic, critic)))
  if config.ema.enabled:
    out["ema"] = offload.copy_to_host(gen, bool(config.offload.ema_on_host))  # jnp.copy keeps the sharding
    out["ema_count"] = build(lambda: jnp.zeros((), jnp.int32))
  return out


def split_batch(batch: dict) -> tuple[dict, dict]:
  """(primary, secondary) samples of a :func:`data.get_pair_batch` batch, in the stage-1/2 batch layout."""
  first = {k: batch[k] for k in ("x0", "history", "target", "prompt_embeds")}
  second = dict(x0=batch["x0_2"], history=batch["history_2"], target=batch["target_2"],
                prompt_embeds=batch["prompt_embeds"])
  return first, second


class Phases:
  """The jitted phases of one AHD step (static: schedules, the GAN switch, the amplify flag).

  With ``layout`` and an example ``state`` (:func:`init_state`'s, same layout) the phases declare their output
  shardings (module docstring); call them under ``jax.set_mesh(layout.mesh)``.
  """

  def __init__(self, config, roles: ahd.Roles, tx_gen, tx_critic, chunk_shape: tuple,
               layout: TrainLayout | None = None, state: dict | None = None):
    self.config, self.roles = config, roles
    self.tx_gen, self.tx_critic = tx_gen, tx_critic
    d = config.dmd
    _, _, t, h, w = chunk_shape
    self.schedules = {amp: ahd.rollout_schedule(tuple(d.rollout_steps), (h, w), t, amp,
                                                gamma=float(config.objective.pyramid_gamma),
                                                stage_range=tuple(config.objective.pyramid_stage_range))
                      for amp in (False, True)}
    self.indices = {k: np.asarray(v) for k, v in losses.history_indices(t).items()}
    obj = config.objective

    def cond_pair(key, sample, negative):
      draws = losses.draw_conditioning(key, sample, obj)
      hist_gen, prompt = losses.conditioning(sample, draws, obj, saturate=bool(obj.add_saturation))
      hist, _ = losses.conditioning(sample, draws, obj, saturate=False)
      neg = jnp.broadcast_to(negative[None], (prompt.shape[0],) + negative.shape)
      idx = {k: jnp.asarray(v) for k, v in self.indices.items()}
      zero = jnp.all(jnp.stack([jnp.all(v == 0) for v in hist_gen.values()]))
      return (dict(history=hist_gen, prompt=prompt, indices=idx),
              dict(history=hist, prompt=prompt, negative=neg, indices=idx), zero)

    def prepare(rng, step, batch, negative):
      key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
      keys = jax.random.split(key, 6)
      first, second = split_batch(batch)
      g1, c1, z1 = cond_pair(keys[0], first, negative)
      g2, c2, z2 = cond_pair(keys[1], second, negative)
      return dict(gen=(g1, c1), critic=(g2, c2), zero=jnp.stack([z1, z2]), keys=keys[2:])

    def rollout(gen_tr, frozen, cond_gen, key, amplify):
      sched = self.schedules[amplify]
      shape = (cond_gen["prompt"].shape[0],) + tuple(chunk_shape[1:])
      fwd = roles.generator(frozen, gen_tr)
      return ahd.student_rollout(fwd, fwd, cond_gen, ahd.draw_rollout(key, shape, sched), sched)

    def score(critic_tr, frozen, x, cond, key, step, gan_active):
      draws = ahd.draw_generator(key, x.shape, step, config)
      return ahd.generator_cotangent(roles, frozen, critic_tr, x, cond, draws, config, gan_active)

    def gen_grads(gen_tr, frozen, cond_gen, key, cot, amplify):
      sched = self.schedules[amplify]
      shape = cot.shape
      grads = ahd.generator_grads(roles, frozen, gen_tr, cond_gen, ahd.draw_rollout(key, shape, sched), cot, sched)
      return grads, optax.global_norm(grads)

    def critic_grads(critic_tr, frozen, x, real, cond, key, gan_active):
      draws = ahd.draw_critic(key, x.shape, config)
      (_, m), grads = jax.value_and_grad(ahd.critic_loss_fn, has_aux=True)(
          critic_tr, roles, frozen, x, real, cond, draws, config, gan_active)
      m["critic_grad_norm"] = optax.global_norm(grads)
      return grads, m

    def update(tx):
      def apply_update(trainable, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state
      return apply_update

    out = {} if layout is None else output_shardings(layout, state, chunk_shape[0])
    jit = lambda fn, name, **kw: jax.jit(fn, **kw, **({"out_shardings": out[name]} if name in out else {}))
    ec = config.ema
    self.prepare = jax.jit(prepare)
    self.rollout = jit(rollout, "rollout", static_argnums=(4,))
    self.score = jit(score, "score", static_argnums=(6,))
    self.gen_grads = jit(gen_grads, "gen_grads", static_argnums=(5,))
    self.critic_grads = jit(critic_grads, "critic_grads", static_argnums=(6,))
    self.gen_update = jit(update(tx_gen), "gen_update", donate_argnums=(0, 1, 2))
    self.critic_update = jit(update(tx_critic), "critic_update", donate_argnums=(0, 1, 2))
    self.ema = jit(lambda e, p, n: ema_lib.ema_update(e, p, n, int(ec.start_step), float(ec.decay)), "ema",
                   donate_argnums=(0,))


def output_shardings(layout: TrainLayout, state: dict, batch: int) -> dict:
  """Declared output shardings of the phases on ``layout``: state-like trees (gradients, updated trainables and
  optimiser states, EMA) on the FSDP rule, batch-like arrays over ``data x fsdp``, metrics replicated."""
  sh, rep = layout.shardings, mesh_lib.replicated(layout.mesh)
  xs = layout.batch_sharding(batch)  # a prefix: the leading (batch) axis of any rank
  gen, critic = state["gen"], state["critic"]
  out = dict(rollout=xs, score=(xs, rep), gen_grads=(sh(gen["trainable"]), rep),
             critic_grads=(sh(critic["trainable"]), rep),
             gen_update=(sh(gen["trainable"]), sh(gen["opt_state"])),
             critic_update=(sh(critic["trainable"]), sh(critic["opt_state"])))
  if "ema" in state:
    out["ema"] = sh(state["ema"])
  return out


def train_step(ph: Phases, trunks: Trunks, state: dict, batch: dict, negative, step: int) -> tuple[dict, dict]:
  """One AHD step on the host: returns (new state, metrics). ``state``'s buffers are donated (consumed)."""
  cfg = ph.config
  host_opt = bool(cfg.offload.optimizer_on_host)
  gan_active = bool(cfg.gan.enabled) and step >= int(cfg.gan.start_step)
  pre = ph.prepare(state["rng"], jnp.int32(step), batch, negative)
  zero = np.asarray(jax.device_get(pre["zero"])) if cfg.dmd.amplify_first_chunk else np.zeros(2, bool)
  k_roll_g, k_gen, k_roll_c, k_critic = pre["keys"]
  new = dict(state)
  m = {}
  is_gen_step = step % int(cfg.dmd.update_ratio) == 0

  def apply(part, tx_update, grads):
    opt = offload.to_device(new[part]["opt_state"], donate=host_opt)  # state is consumed: free the host copy
    trainable, opt = tx_update(new[part]["trainable"], opt, grads)
    new[part] = dict(trainable=trainable, opt_state=offload.to_host(opt, host_opt, donate=True))

  if is_gen_step:
    cond_gen, cond = pre["gen"]
    amp = bool(zero[0])
    x = ph.rollout(new["gen"]["trainable"], trunks.get("gen"), cond_gen, k_roll_g, amp)
    cot, gm = ph.score(new["critic"]["trainable"], trunks.get("teacher"), x, cond, k_gen, jnp.int32(step), gan_active)
    grads, gnorm = ph.gen_grads(new["gen"]["trainable"], trunks.get("gen"), cond_gen, k_roll_g, cot, amp)
    m.update(gm, gen_grad_norm=gnorm)
    apply("gen", ph.gen_update, grads)

  cond_gen, cond = pre["critic"]
  x = ph.rollout(new["gen"]["trainable"], trunks.get("gen"), cond_gen, k_roll_c, bool(zero[1]))
  real = jnp.asarray(batch["target_2"], jnp.float32)
  grads, cm = ph.critic_grads(new["critic"]["trainable"], trunks.get("teacher"), x, real, cond, k_critic, gan_active)
  m.update(cm)
  apply("critic", ph.critic_update, grads)

  if "ema" in new and (is_gen_step or step < int(cfg.ema.start_step)):
    count = new["ema_count"] + 1
    e = ph.ema(offload.to_device(new["ema"], donate=bool(cfg.offload.ema_on_host)), new["gen"]["trainable"], count)
    new["ema"] = offload.to_host(e, bool(cfg.offload.ema_on_host), donate=True)
    new["ema_count"] = count
  new["step"] = state["step"] + 1
  return new, m


def train(config, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) the DMD loop in ``workdir`` (same contract as
  :func:`helios_jax.training.trainers.base.train`)."""
  layout = TrainLayout.from_config(config)  # config.mesh; one device when absent
  graphdef, trunks = build_trunks(config, layout)
  model_config = nnx.merge(graphdef, trunks.gen).config
  roles = make_roles(config, graphdef)
  tx_gen, _ = state_lib.make_optimizer(config.optim)
  tx_critic, _ = state_lib.make_optimizer(config.critic_optim)
  opened = loop.open_run(config, workdir, init_state(config, trunks, model_config, tx_gen, tx_critic, layout))
  prefetch = data.Prefetcher(make_source(config), opened.start, int(config.batch_size), int(config.data.seed),
                             batch_fn=data.get_pair_batch)
  negative = mesh_lib.place(negative_embeds(config), mesh_lib.replicated(layout.mesh))
  phases = []  # built at the first step, from its batch's shape

  def do_step(st, step, batch):
    batch = layout.place_batch(batch)
    if not phases:
      phases.append(Phases(config, roles, tx_gen, tx_critic, batch["target"].shape, layout, st))
    return train_step(phases[0], trunks, st, batch, negative, step)

  def export(st):
    trainable = offload.to_device(st["ema"]) if "ema" in st else st["gen"]["trainable"]
    export_merged(os.path.join(workdir, "merged"), graphdef, offload.to_device(trunks.gen), trainable, config.train)

  state, summary = loop.run_from_config(config, workdir, opened, do_step, lambda: prefetch.next()[1],
                                        desc="train ahd", loss_key="critic_loss", progress=progress,
                                        mesh=layout.mesh, close=prefetch.close, export=export)
  return dict(summary, num_trainable=lora.count(state["gen"]["trainable"]),
              num_critic_trainable=lora.count(state["critic"]["trainable"]))
