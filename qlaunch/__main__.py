from qlaunch.cli.app import main

raise SystemExit(main())
