"""Evaluation of checkpoints and exported models.

tasks.py (the JSONL task format; the project's own tasks come from data/synthetic.py), lm.py (a
model of either format behind one interface), multiple_choice.py and code.py (the scorers; code
runs in sandbox.py, its child side in sandbox_runner.py), score.py (the loop over tasks, and the
prompt format: raw or a chat template), harness.py (lm-evaluation-harness), results.py (results
files and the comparison of arms).
tools/evaluate.py and megatron_code/study.py call score.py.
"""
