"""The driver's parts that need no cluster: its typed state (state.py: what a checkpoint's
``driver.json`` holds, the bad-step count, the failures the loop recovers from), when things
happen (cadence.py: sync, evaluation, checkpoint and export steps), what a step reports
(metrics.py: the metrics line, the run's totals, the progress bar) and the interfaces the loop
drives (ports.py: rollout, teacher, learner and the runtime holding them). The loop itself is
``tip_ray.trainer``; the Ray runtime behind the interfaces is ``tip_ray.runtime.ray_runtime``.
"""
