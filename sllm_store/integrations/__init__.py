"""Integrations with inference engines: vLLM's ``sllm`` load format
(:mod:`sllm_store.integrations.vllm`, registered through the ``vllm.general_plugins`` entry point)
and SGLang's loader class (:mod:`sllm_store.integrations.sglang`); what they share is in
:mod:`sllm_store.integrations.engine`."""
