from qlaunch.cli import main

raise SystemExit(main())
