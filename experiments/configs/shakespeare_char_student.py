"""A student at 1/4 of shakespeare_char's parameters, distilled from a shakespeare_char run.

  python -m train --config=experiments/configs/shakespeare_char.py --workdir=/tmp/teacher
  python -m train --config=experiments/configs/shakespeare_char_student.py \
      --workdir=/tmp/student_kd --config.distill.teacher=/tmp/teacher
  python -m train --config=experiments/configs/shakespeare_char_student.py \
      --workdir=/tmp/student_scratch --config.train.objective=lm
  python -m eval --workdir=/tmp/student_kd      # and /tmp/student_scratch

shakespeare_char's recipe (2000 steps, batch 12, context 64) with width 64 and F = 172: 202,368
parameters against the teacher's 800,000. Distillation at temperature 2, alpha 0.5
(train/objectives/distill.py); the third command trains the same student from scratch on the
same steps. docs/training.md gives the measured validation losses and the time on 2 cores.
"""

from experiments.configs import base, shakespeare_char


def get_config(preset=''):
  c = shakespeare_char.get_config()
  c.model.update(d_model=64, d_ff=172)
  c.train.objective = 'distill'
  return base.with_preset(c, preset)
