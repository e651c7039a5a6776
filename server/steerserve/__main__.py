from steerserve.cli import main

main()
