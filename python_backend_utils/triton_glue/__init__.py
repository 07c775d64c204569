"""The Triton Python-backend glue every model uses: request and response tensors, metrics, the
text side (tokenizer, incremental detokenizer, input limits) and the supervision of stub processes.
The worker models' own glue is in serving/, the orchestrator's in orchestration/."""
