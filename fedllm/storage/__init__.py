"""The bottom layer: databases and files, with no knowledge of what is stored in them.

- `database`: SQLAlchemy engines whose SQLite writes take the lock at BEGIN, and safe
  concurrent schema creation (privacy ledgers, users, ε quotas, the router's node list).
- `files`: atomic writes, exclusive creation, and files and directories private to their owner.

Nothing here imports another fedllm package; every other layer may import it.
"""
