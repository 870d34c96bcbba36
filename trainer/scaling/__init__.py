"""The scale simulator (docs/SCALING.md), a part of its own: nothing in training imports it. It predicts the step
time, its breakdown and the memory of every placement policy on GPU clusters of 16 to 1024 devices, from recorded
routing traces or Zipf skew, with the training code's own planner (``hecate.parallel.fssdp``) and sparse-collective
plans (``hecate.collectives.plan``).

- routing traces come from ``hecate.trainer.routing_trace`` (the file and the recorder behind
  ``hecate train --record-routing``, a part of training);
- ``loads``: routing sources (trace replay, Zipf); which copy computes each pair is the dispatcher's own
  ``hecate.parallel.moe.assignment.rows_by_destination``;
- ``cluster``, ``workload``: the machine and the model; ``comm``: collectives' time from their bytes;
- ``cost``: one MoE layer's phases under the engine's overlap rules, memory per device;
- ``simulate``: the step loop over policies and sizes; ``report``: the ``hecate simulate`` command's output.
"""
