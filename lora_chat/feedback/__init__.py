"""What people said about the replies a server gave: recorded exchanges and feedback, ranked, exported as training data.

    lorachat serve adapters/faq-en adapters/faq-sv --record feedback/     # each exchange and vote, append-only
    lorachat feedback report feedback/ --html feedback.html               # votes, win rates, Bradley-Terry
    lorachat feedback export feedback/ --sft sft.jsonl --pairs pairs.jsonl

Modules by job: `store` (the append-only JSONL files several servers share, and the reader that survives a
kill -9), `ranking` (votes, human win rates with intervals, a Bradley-Terry ranking with bootstrap intervals),
`export` (SFT rows and preference pairs, personal data masked, duplicates dropped), `report` (terminal and
HTML). The server side (`serve/recording.py`) writes through `store`; nothing here knows of HTTP.
"""
