from mmeff_lab.cli import main

main()
