from saeguard.cli import main

raise SystemExit(main())
