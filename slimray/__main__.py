from slimray.cli import main

main()
