"""The task package: one interface for a kind of task (base.py), one file per kind (seq2seq.py,
nlg.py, dialogue.py, qa.py, template.py), the table of built-in tasks (table.py), task files of
user tasks (task_file.py) and the one registry of metrics (metrics.py). See ARCHITECTURE.md."""
