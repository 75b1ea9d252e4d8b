from diffdistill.cli import main

raise SystemExit(main())
