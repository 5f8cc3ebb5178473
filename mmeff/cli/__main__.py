from mmeff.cli import main

main()
