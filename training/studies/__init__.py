"""Studies that run many trainings or samplings and write a results folder: the exposure-bias study
(study.py) and the generalization/memorization study (generalization_study.py)."""
