"""Post-training on integer addition: base -> SFT -> reward model, and DPO from SFT.

  python -m experiments.posttrain --workdir=runs/posttrain
  python -m experiments.posttrain --workdir=runs/posttrain_quick \
      --config=experiments/configs/posttrain.py:quick   # every stage, short
      # 280 s at a load of 4-5; 1,110 s at 8-10 (326 CPU s); accuracies near 0 at these lengths

Every stage is a normal training run in DIR/<stage>/ (resumable; re-running skips the stages
finished from the same config, experiments/stages.py). The task (experiments/posttrain/task.py):
a + b with operands up to task.max_operand; the base model reads documents of sums as equations
and prose, task.error_rate of them wrong; SFT teaches the chat format on demonstrations; the
reward model learns right answers from wrong ones; DPO starts from SFT on pairs sampled from it,
labelled by correctness; GRPO starts from SFT with the exact-match reward, RLHF (PPO) from SFT
against the reward model. The measured accuracies and wall time are in docs/posttrain.md.
"""

from ml_collections import ConfigDict

from experiments.configs import base

EXACT_MATCH = 'experiments.posttrain.task:exact_match'


def get_config(preset=''):
  c = base.get_config()
  c.task = ConfigDict(dict(
      max_operand=99,           # a + b with a, b in [0, max_operand]
      num_train=9_500,          # problems the documents, demonstrations and pairs draw on
      num_test=500,             # held out: every stage's exact-match accuracy
      error_rate=0.2,           # chance that one statement of a sum in the corpus is wrong
      passes=4,                 # statements of each training problem in the corpus
      equation_share=0.7,       # of them as equations 'a + b = c' (the rest prose)
      lines_per_document=20,
      num_demonstrations=3_000,  # SFT's (the first training problems)
      num_rl_prompts=2_500,     # the RL stages' questions, which no other stage sees
      num_pairs=7_000,          # the reward model's pairs (right vs a plausible wrong answer),
                                # from every other training problem
      seed=0,
      tfds_data_dir='',
  ))
  c.model.update(d_model=128, num_heads=4, d_ff=344, pattern='attn*4', position='rope',
                 norm='rmsnorm', activation='swiglu', scan_layers=False)
  c.data.update(tokenizer='byte', seq_len=48, val_fraction=0.05)
  # One byte ends a turn, so generation stops on one token.
  c.chat.update(system='System: ', user='User: ', assistant='Assistant: ', end_of_turn='\n')
  c.train.update(batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=50, schedule='cosine',
                 b2=0.99, weight_decay=0.1, grad_clip=1.0, steps_per_call=25, log_every=50,
                 eval_every=0, eval_batch_size=64, checkpoint_every=500)
  # Each stage's train.* settings, over the ones above.
  c.stages = ConfigDict(dict(
      base=ConfigDict(dict(num_steps=4000)),
      # 500 SFT steps leave the SFT model room (1,000 reach 96% held out: docs/posttrain.md).
      sft=ConfigDict(dict(num_steps=500, lr=3e-4, warmup_steps=20)),
      reward=ConfigDict(dict(num_steps=1000, lr=3e-4, warmup_steps=20)),
      dpo=ConfigDict(dict(num_steps=150, lr=3e-5, min_lr=3e-6, warmup_steps=10, batch_size=16)),
      # RL: each step is a rollout of batch_size prompts x rl.group_size answers, then updates.
      # RL's constant schedule ignores min_lr; 0 keeps it below lr (train.min_lr <= train.lr).
      grpo=ConfigDict(dict(num_steps=200, lr=3e-5, min_lr=0.0, warmup_steps=0, schedule='constant',
                           batch_size=32, log_every=10, checkpoint_every=50,
                           rl=dict(reward=EXACT_MATCH, accuracy=EXACT_MATCH))),
      rlhf=ConfigDict(dict(num_steps=100, lr=3e-5, min_lr=0.0, warmup_steps=0, schedule='constant',
                           batch_size=16, log_every=5, checkpoint_every=20,
                           rl=dict(accuracy=EXACT_MATCH))),  # reward: the reward stage's run
  ))
  c.rl.update(group_size=8, max_new_tokens=6, temperature=1.0, num_minibatches=2, beta=0.04)
  # The chosen answers' next-token loss beside Bradley-Terry keeps the reward model learning
  # what a right sum is (held-out pairwise accuracy 83.6% without it, 98.6% with it).
  c.reward.update(lm_weight=1.0)
  c.dpo.update(beta=0.1, nll_weight=1.0)  # RPO's NLL term holds up the chosen answers
  # DPO's pairs: answers sampled from the SFT model, a right and a wrong one per prompt.
  c.sampling = ConfigDict(dict(num_prompts=3_000, samples_per_prompt=4, temperature=1.0))
  c.eval = ConfigDict(dict(few_shot=3, max_new_tokens=6, batch_size=100))
  # Every stage, each a tenth as long or less, on a fifth of the problems.
  return base.with_preset(c, preset, quick={
      'task.num_train': 1_900, 'task.num_test': 100, 'task.num_demonstrations': 600,
      'task.num_rl_prompts': 500, 'task.num_pairs': 1_400, 'sampling.num_prompts': 300,
      'stages.base.num_steps': 400, 'stages.sft.num_steps': 100, 'stages.reward.num_steps': 100,
      'stages.dpo.num_steps': 20, 'stages.grpo.num_steps': 10, 'stages.rlhf.num_steps': 6,
      'stages.grpo.checkpoint_every': 10, 'stages.rlhf.checkpoint_every': 6})
