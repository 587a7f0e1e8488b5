from sllm_store.cli import main

raise SystemExit(main())
