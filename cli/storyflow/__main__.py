from storyflow.commands import main

main()
