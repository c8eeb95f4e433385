from titan_rl.launch import main

raise SystemExit(main())
