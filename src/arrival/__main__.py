from arrival.cli import main

main()
