"""Evaluation of checkpoints and exported models.

tasks.py (the JSONL task format) and synthetic.py (the project's own tasks), lm.py (a model of
either format behind one interface), multiple_choice.py and code.py (the scorers; code runs in
sandbox.py), score.py (the loop over tasks, and the prompt format: raw or a chat template),
harness.py (lm-evaluation-harness), results.py (results files and the comparison of arms).
tools/evaluate.py and megatron_code/study.py call score.py.
"""
