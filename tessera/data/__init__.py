"""The user's data, in the formats the field already uses, for every stage.

records.py   Conversation / Turn / PreferencePair / PromptRecord, where each came from (file:line),
DataError
readers.py   rows from JSONL, JSON, Parquet files and InternVL meta JSONs (root, annotation,
repeat_time)
internvl.py  InternVL fine-tuning rows ⇄ Conversations; MMPR pairs and GSPO prompts from rows
encode.py    a Conversation → token ids and loss mask (the same text the world's samples make)
scan.py      every record checked before training starts (images, gpt turns, length);
--skip-bad-records
rewards.py   answer checkers: exact, numeric, choice, boxed; `module:function` for a user's own
world.py     the world as one more source of Conversations, and its export to InternVL files

The world (tessera.world) sits below this package; training (tessera.train) reads it.
"""

from tessera.data.records import Conversation, DataError, PreferencePair, PromptRecord, Turn

__all__ = ["Conversation", "DataError", "PreferencePair", "PromptRecord", "Turn"]
