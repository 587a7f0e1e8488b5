from sllm_store.cli import main

if __name__ == "__main__":  # not in the processes vLLM spawns (save-vllm)
    raise SystemExit(main())
