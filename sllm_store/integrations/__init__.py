"""Integrations with inference engines: vLLM's ``sllm`` load format (:mod:`sllm_store.integrations.vllm`,
registered through the ``vllm.general_plugins`` entry point)."""
