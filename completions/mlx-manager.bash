_mlx_manager_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _MLX_MANAGER_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _mlx_manager_completion mlx-manager
