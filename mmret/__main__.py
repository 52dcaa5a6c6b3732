from mmret.cli import main

main()
