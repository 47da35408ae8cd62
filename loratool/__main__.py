from loratool.cli import main

main()
